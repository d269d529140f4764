"""Tokenizers from a Hugging Face tokenizer.json or rebuilt from GGUF metadata, and chat templates."""

from __future__ import annotations

import json
from pathlib import Path

from flashllm.errors import FlashLLMError

# Pre-tokenizer split patterns by GGUF `tokenizer.ggml.pre` (llama.cpp's names).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
          "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
SENTENCEPIECE_ARCHS = ("gemma", "gemma2", "gemma3")  # the SentencePiece vocabularies built the Gemma way
SPACE, END_OF_TURN = "\u2581", "<end_of_turn>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of every byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


class Tokenizer:
    """Encode, decode and render chat prompts; saved as tokenizer.json + tokenizer_config.json."""

    def __init__(self, backend, bos_token_id: int | None, eos_token_ids: list[int], add_bos: bool,
                 chat_template: str | None):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.add_bos = add_bos
        self.chat_template = chat_template

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, meta: dict) -> "Tokenizer":
        from tokenizers import AddedToken

        kind, arch = meta.get("tokenizer.ggml.model"), meta.get("general.architecture")
        if kind == "gpt2":
            backend, vocab, special_ok = _byte_level_bpe(meta)
        elif kind == "llama" and arch in SENTENCEPIECE_ARCHS:
            backend, vocab = _gemma_sentencepiece(meta)
            special_ok = bool  # every control token (none is empty)
        else:
            raise FlashLLMError(f"GGUF tokenizer model {kind!r} of {arch!r} is not supported (supported: gpt2 "
                                f"byte-level BPE, llama SentencePiece of {', '.join(SENTENCEPIECE_ARCHS)})")
        tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
                                    if k == CONTROL and special_ok(t)])
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
                            if k == USER_DEFINED and t in vocab])
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eos_ids = [int(eos)] if eos is not None else []
        eot = meta.get("tokenizer.ggml.eot_token_id")
        if eot is None and kind == "llama" and END_OF_TURN in tokens:  # llama.cpp ends a Gemma turn there too
            eot = tokens.index(END_OF_TURN)
        if eot is not None and int(eot) not in eos_ids:
            eos_ids.append(int(eot))
        bos = meta.get("tokenizer.ggml.bos_token_id")
        return cls(backend, int(bos) if bos is not None else None, eos_ids,
                   bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")), meta.get("tokenizer.chat_template"))

    @classmethod
    def from_folder(cls, folder: Path, config: dict | None = None) -> "Tokenizer | None":
        """A tokenizer.json with tokenizer_config.json beside it (HF folder or bundle); None if absent."""
        from tokenizers import Tokenizer as Backend

        path = Path(folder) / "tokenizer.json"
        if not path.exists():
            return None
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # the tokenizers library raises its own exception types
            raise FlashLLMError(f"{path}: not a readable tokenizer.json ({e})") from None
        settings = _read_json(Path(folder) / "tokenizer_config.json")
        config = config or {}

        def token_id(value):
            if isinstance(value, dict):
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else value

        bos = settings.get("bos_token_id", token_id(settings.get("bos_token")))
        if bos is None:
            bos = config.get("bos_token_id")
        eos = settings.get("eos_token_ids")
        if eos is None:
            eos = token_id(settings.get("eos_token"))
            eos = config.get("eos_token_id") if eos is None else eos
            generation = _read_json(Path(folder) / "generation_config.json").get("eos_token_id")
            eos = [e for e in _as_list(eos) + _as_list(generation) if e is not None]
        template = settings.get("chat_template")
        if template is None and (Path(folder) / "chat_template.jinja").exists():
            template = (Path(folder) / "chat_template.jinja").read_text()
        return cls(backend, bos, sorted(set(_as_list(eos))), bool(settings.get("add_bos_token", False)), template)

    def save(self, folder: Path) -> None:
        self.backend.save(str(Path(folder) / "tokenizer.json"))
        settings = {"bos_token_id": self.bos_token_id, "eos_token_ids": self.eos_token_ids,
                    "add_bos_token": self.add_bos, "chat_template": self.chat_template}
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps(settings, indent=1))

    # -- using -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, by the checkpoint's own chat template."""
        if not self.chat_template:
            raise FlashLLMError("this model has no chat template; run without --chat")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise FlashLLMError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        token = lambda i: self.backend.id_to_token(i) if i is not None else ""  # noqa: E731
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=token(self.bos_token_id), eos_token=token((self.eos_token_ids or [None])[0]))
        except jinja2.TemplateError as e:
            raise FlashLLMError(f"chat template failed: {e}") from None


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


def _byte_level_bpe(meta: dict):
    """GPT-2 style byte-level BPE: (backend, vocabulary, which control tokens may be added)."""
    from tokenizers import Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = Backend(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                          end_of_word_suffix="", fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == "smollm":  # digits one by one, then GPT-2's split (llama.cpp's `smollm`)
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend, vocab, lambda token: set(token) <= alphabet  # a control token outside it is a mislabel


def _gemma_sentencepiece(meta: dict):
    """Gemma's SentencePiece as a BPE with byte fallback, spaces written as ▁ and no prefix space, built as
    transformers builds it from a GGUF: runs of spaces respelled as ▁ runs, and the merges (the file has
    none) recovered from the vocabulary, ranked by the tokens' order in the file (not their scores)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in meta["tokenizer.ggml.tokens"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    backend = Backend(BPE(vocab=vocab, merges=_merges_by_rank(vocab, {t: -i for i, t in enumerate(tokens)}),
                          fuse_unk=True, unk_token=tokens[unk] if unk is not None else "<unk>", dropout=None,
                          byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", SPACE)
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend, vocab


def _merges_by_rank(vocab: dict[str, int], rank: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best ranked token first (ties: longer left, then right
    piece first), as transformers' generate_merges orders them."""
    merges = []
    for token, score in rank.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        merges += [(left, right, score) for left, right in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FlashLLMError(f"{path}: not readable JSON ({e})") from None


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
