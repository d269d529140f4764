"""Checks of what a model is built from, before anything is built: a table of fields (type and range,
declared once: `Field`), a model config's values and how they relate, and a GGUF file's metadata
against its own tensors. A value that cannot be right (no layers, heads that do not divide, a NaN
epsilon, a context of 0) is refused in one line naming the field and where it came from, instead of
converting into a model that computes garbage or a loop that never ends. bundle/schema.py declares a
bundle's manifest and predictors with the same `Field`s."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from flashllm.errors import FlashLLMError
from flashllm.sources.base import NameTable

MAX_CONTEXT = 1 << 24  # tokens: beyond any model's context (the rotary tables alone would take GBs)
ROPE_TYPES = ("default", "linear", "llama3", "dynamic")  # what models/layers.Rotary computes (dynamic: as default)
_KINDS = {"int": "an integer", "number": "a number", "str": "a string", "bool": "true or false",
          "list": "a list", "dict": "an object", "file": "a file name"}


@dataclass(frozen=True)
class Field:
    """One value of a JSON-like document: its kind (int, number, str, bool, list, dict or file: a path
    that must name a regular file inside the folder in the context) and range. Numbers are finite."""

    kind: str
    required: bool = True
    null: bool = False  # None is accepted
    low: float | None = None  # inclusive bounds (a str names a number in the context, e.g. "n_ff")
    high: float | None = None
    above: float | None = None  # exclusive bounds
    below: float | None = None
    choices: tuple | None = None  # None: any value; () would refuse every value
    keys: dict[str, "Field"] | None = None  # dict: these keys (any other key is accepted and ignored)
    values: "Field | None" = None  # dict: every value (keys are free); list: every item
    length: int | str | None = None  # list: exactly this many items; a str names a number in the context
    min_items: int = 0
    items: tuple["Field", ...] = ()  # list: a fixed tuple, e.g. [name, width]
    name: str = ""  # what the value is, for messages (e.g. "one per layer")


def Int(low=None, high=None, **kw) -> Field:  # noqa: N802 (the table reads as a declaration)
    return Field("int", low=low, high=high, **kw)


def Number(**kw) -> Field:  # noqa: N802
    return Field("number", **kw)


def Str(*choices: str, **kw) -> Field:  # noqa: N802
    return Field("str", choices=tuple(choices) or None, **kw)


def Bool(**kw) -> Field:  # noqa: N802
    return Field("bool", **kw)


def List(values: Field | None = None, **kw) -> Field:  # noqa: N802
    return Field("list", values=values, **kw)


def Dict(keys: dict[str, Field] | None = None, **kw) -> Field:  # noqa: N802
    return Field("dict", keys=keys, **kw)


def show(value) -> str:
    """A value as a message quotes it: short, one line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return f"a list of {len(value)}" if isinstance(value, list) else "an object"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


_IS = {"int": is_int, "number": is_number, "bool": lambda v: isinstance(v, bool), "list": lambda v: isinstance(v, list),
       "dict": lambda v: isinstance(v, dict), "str": lambda v: isinstance(v, str), "file": lambda v: isinstance(v, str)}


def check(value, spec: Field, where: str, context: dict | None = None) -> None:
    """Raise a one-line FlashLLMError naming `where` (e.g. "m.json: ffn.layers[2].stride") if `value`
    does not fit `spec`; recurses into lists and objects."""
    context = context or {}
    if value is None:
        if spec.null:
            return
        raise FlashLLMError(f"{where} is null, must be {_KINDS[spec.kind]}")
    if not _IS[spec.kind](value):
        finite = " (finite)" if spec.kind == "number" and isinstance(value, float) else ""
        raise FlashLLMError(f"{where} is {show(value)}, must be {_KINDS[spec.kind]}{finite}")
    if spec.choices is not None and value not in spec.choices:
        known = f"choose from {', '.join(map(str, spec.choices))}" if spec.choices else "this flashllm knows none"
        raise FlashLLMError(f"{where} {show(value)} is not supported ({known})")
    if spec.kind in ("int", "number"):
        _check_range(value, spec, where, context)
    elif spec.kind == "file":
        inside(Path(context["folder"]), value, where, must_exist=context.get("files", True))
    elif spec.kind == "list":
        _check_list(value, spec, where, context)
    elif spec.kind == "dict":
        sep = " " if where.endswith(":") else "."  # "m.json: ffn.d" at the top, then dotted
        for key, sub in (spec.keys or {}).items():
            if key not in value:
                if sub.required:
                    raise FlashLLMError(f"{where}{sep}{key} is missing")
                continue
            check(value[key], sub, f"{where}{sep}{key}", context)
        if spec.values is not None:
            for key, item in value.items():
                check(item, spec.values, f"{where}[{key!r}]", context)


def _check_range(value, spec: Field, where: str, context: dict) -> None:
    bounds = [(spec.low, lambda v, b: v >= b, ">="), (spec.high, lambda v, b: v <= b, "<="),
              (spec.above, lambda v, b: v > b, ">"), (spec.below, lambda v, b: v < b, "<")]
    for bound, ok, sign in bounds:
        bound = context.get(bound) if isinstance(bound, str) else bound  # a str names a number in the context
        if bound is not None and not ok(value, bound):
            raise FlashLLMError(f"{where} is {show(value)}, must be {sign} {bound}")


def _check_list(value: list, spec: Field, where: str, context: dict) -> None:
    length = context.get(spec.length) if isinstance(spec.length, str) else spec.length
    if length is not None and len(value) != length:
        what = f" ({spec.name})" if spec.name else ""
        raise FlashLLMError(f"{where} has {len(value)} entries, must have {length}{what}")
    if len(value) < spec.min_items:
        raise FlashLLMError(f"{where} has {len(value)} entries, must have at least {spec.min_items}")
    if spec.items:
        if len(value) != len(spec.items):
            raise FlashLLMError(f"{where} has {len(value)} entries, must have {len(spec.items)}")
        for i, (item, sub) in enumerate(zip(value, spec.items)):
            check(item, sub, f"{where}[{i}]", context)
    elif spec.values is not None:
        item = spec.values
        if item.kind in ("int", "number", "str", "bool") and item.choices is None and not item.null and \
                (item.low, item.high, item.above, item.below) == (None, None, None, None):
            is_kind = _IS[item.kind]  # a long list of plain values (a tokenizer's): no call per item
            bad = next((i for i, v in enumerate(value) if not is_kind(v)), None)
            if bad is not None:
                check(value[bad], item, f"{where}[{bad}]", context)
            return
        for i, v in enumerate(value):
            check(v, item, f"{where}[{i}]", context)


def inside(folder: Path, name: str, where: str, must_exist: bool = True) -> Path:
    """folder/name, refused unless it resolves (symbolic links followed) inside folder; with must_exist,
    also unless it is a regular file there. Never opens it."""
    try:
        root = folder.resolve()
        path = (root / name).resolve()
        if not name or "\0" in name or root not in path.parents:
            raise FlashLLMError(f"{where} {show(name)} is outside the bundle folder {folder}")
        if path.exists() and not path.is_file():
            raise FlashLLMError(f"{where} {show(name)} is not a regular file")
        if must_exist and not path.exists():
            raise FlashLLMError(f"{where} {show(name)} is missing; run `flashllm verify {folder}`")
    except (OSError, ValueError, RuntimeError) as e:  # a name too long, a loop of links
        raise FlashLLMError(f"{where} {show(name)} cannot be resolved ({e})") from None
    return path


# -- a model config -----------------------------------------------------------------------------------
# values of an HF-style config dict by name (any family; absent keys take the family's defaults)
CONFIG = Dict({
    "model_type": Str(required=False),
    **{k: Int(1, required=False) for k in ("vocab_size", "hidden_size", "intermediate_size", "ffn_dim",
                                            "num_hidden_layers", "num_attention_heads", "word_embed_proj_dim")},
    "num_key_value_heads": Int(1, required=False, null=True),
    "head_dim": Int(1, required=False, null=True),
    "max_position_embeddings": Int(1, MAX_CONTEXT, required=False),
    "rms_norm_eps": Number(above=0, below=1, required=False),
    "rope_theta": Number(above=0, required=False),
    "rope_scaling": Dict(required=False, null=True),
    "tie_word_embeddings": Bool(required=False), "attention_bias": Bool(required=False),
    "hidden_act": Str(required=False), "activation_function": Str(required=False),
    "bos_token_id": Int(0, required=False, null=True),
})


def check_config(config, where: str) -> None:
    """A built config (any family) whose values cannot describe a model is refused: sizes below 1, a
    head count that does not divide, a key/value head count that does not divide the heads, an odd
    rotary head size, a non-finite or non-positive epsilon or rope base, an unknown rope scaling."""
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings")
    for name in sizes:
        value = getattr(config, name)
        check(value, Int(1, MAX_CONTEXT if name == "max_position_embeddings" else None), f"{where}.{name}")
    heads, kv, d = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
    if heads % kv:
        raise FlashLLMError(f"{where}.num_key_value_heads is {kv}, which does not divide num_attention_heads {heads}")
    if d % heads and config.head_dim == d // heads:  # head_dim derived from hidden_size, not given
        raise FlashLLMError(f"{where}.num_attention_heads is {heads}, which does not divide hidden_size {d}")
    if hasattr(config, "rope_theta"):
        check(config.rope_theta, Number(above=0), f"{where}.rope_theta")
        check(config.rms_norm_eps, Number(above=0, below=1), f"{where}.rms_norm_eps")
        if config.head_dim % 2:
            raise FlashLLMError(f"{where}.head_dim is {config.head_dim}, must be even (rotary embeddings pair values)")
        _check_rope_scaling(getattr(config, "rope_scaling", None), f"{where}.rope_scaling")
    for name in ("bos_token_id", "eos_token_id"):
        ids = getattr(config, name, None)
        for token in ids if isinstance(ids, list) else [ids]:
            if token is not None and not (is_int(token) and 0 <= token < config.vocab_size):
                raise FlashLLMError(f"{where}.{name} is {show(token)}, must be a token id below vocab_size "
                                    f"{config.vocab_size}")


def _check_rope_scaling(scaling, where: str) -> None:
    if not scaling:
        return
    check(scaling, Dict(), where)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise FlashLLMError(f"{where}: rope type {show(kind)} is not supported (supported: {', '.join(ROPE_TYPES)})")
    needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings")}.get(kind, ())
    for key in needed:
        check(scaling.get(key), Number(above=0), f"{where}.{key}")
    if kind == "llama3" and scaling["low_freq_factor"] == scaling["high_freq_factor"]:
        raise FlashLLMError(f"{where}: low_freq_factor equals high_freq_factor")


# -- a GGUF file -------------------------------------------------------------------------------------
GGUF = {  # "{arch}." + key -> its field (llama.cpp's names)
    "block_count": Int(1), "embedding_length": Int(1), "feed_forward_length": Int(1),
    "attention.head_count": Int(1),
    "attention.head_count_kv": Int(1, required=False), "attention.key_length": Int(1, required=False),
    "context_length": Int(1, MAX_CONTEXT, required=False), "vocab_size": Int(1, required=False),
    "attention.layer_norm_rms_epsilon": Number(above=0, below=1, required=False),
    "rope.freq_base": Number(above=0, required=False),
}
GGUF_TOKENIZER = {
    "tokenizer.ggml.model": Str(required=False), "tokenizer.ggml.pre": Str(required=False),
    "tokenizer.ggml.tokens": List(Str(), min_items=1, required=False),
    "tokenizer.ggml.token_type": List(Int(), length="tokens", name="one per token", required=False),
    "tokenizer.ggml.merges": List(Str(), required=False),
    "tokenizer.ggml.bos_token_id": Int(0, required=False), "tokenizer.ggml.eos_token_id": Int(0, required=False),
}


def check_gguf(path: Path, meta: dict, arch: str, tensors: dict[str, tuple[int, ...]]) -> None:
    """A GGUF file's metadata, before a config is built from it: every field the config reads has its
    type and range, block_count matches the blk.N tensors the file holds, and the tokenizer's tokens fit
    the vocabulary. tensors: name -> shape (numpy order)."""
    for key, spec in GGUF.items():
        name = f"{arch}.{key}"
        if name in meta:
            check(meta[name], spec, f"{path}: {name}")
        elif spec.required:
            raise FlashLLMError(f"{path}: {name} is missing")
    tokens = meta.get("tokenizer.ggml.tokens")
    context = {"tokens": len(tokens) if isinstance(tokens, list) else None}
    for name, spec in GGUF_TOKENIZER.items():
        if name in meta:
            check(meta[name], spec, f"{path}: {name}", context)
    blocks = {int(m.group(1)) for t in tensors if (m := re.match(r"blk\.(\d+)\.", t))}
    count = meta[f"{arch}.block_count"]
    if len(blocks) != count or (blocks and max(blocks) != count - 1):  # blocks 0..count-1, without range(count)
        raise FlashLLMError(f"{path}: {arch}.block_count is {count}, but the file holds tensors of "
                            f"{len(blocks)} blocks" + (f" (numbered up to {max(blocks)})" if blocks else ""))
    if isinstance(tokens, list):
        for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
            if meta.get(key, 0) >= len(tokens):
                raise FlashLLMError(f"{path}: {key} is {meta[key]}, beyond the {len(tokens)} tokens")
        embed = tensors.get("token_embd.weight")
        vocab = meta.get(f"{arch}.vocab_size") or (embed[0] if embed else len(tokens))
        if len(tokens) > vocab:
            raise FlashLLMError(f"{path}: the tokenizer has {len(tokens)} tokens, more than the vocabulary of {vocab}")


def check_gguf_config(path: Path, config, family, tensors: dict[str, tuple[int, ...]]) -> None:
    """The config built from a GGUF file's metadata (`check_config`), then every tensor the config
    implies against the file's shapes, all up front, so a convert stops before it writes anything."""
    check_config(config, f"{path}: config")
    expected, table = config.expected_shapes(), NameTable(family.gguf_names)
    for name, shape in tensors.items():
        canonical = table.map(name)
        if canonical is not None and canonical in expected and tuple(shape) != expected[canonical]:
            raise FlashLLMError(f"{path}: tensor {name} has shape {tuple(shape)}, the metadata implies "
                                f"{expected[canonical]}")
