"""Checks of what a command is given before it starts: text that must be UTF-8 (a prompt), a context
that the model holds (perplexity's and train-predictor's chunks). Each failure is one line."""

from __future__ import annotations

from pathlib import Path

from flashllm.bundle.reader import is_bundle, open_model
from flashllm.errors import FlashLLMError


def utf8(text: str | None, what: str) -> str | None:
    """Command-line text as given; bytes that are not UTF-8 (kept by Python as lone surrogates) are a
    one-line error naming the first of them, not a traceback from the tokenizer or the terminal."""
    try:
        if text is not None:
            text.encode("utf-8")
        return text
    except UnicodeEncodeError as e:
        bad = text[e.start]
        raw = bad.encode("utf-8", "surrogateescape").hex() if "\udc80" <= bad <= "\udcff" else f"{ord(bad):x}"
        raise FlashLLMError(f"{what} is not valid UTF-8 (byte 0x{raw} at character {e.start}); "
                            f"give the text in UTF-8") from None


def check_context(path: Path, context: int, text: str | Path | None = None, max_tokens: int | None = None,
                  bundle_only: bool = False, default: int | None = None) -> int:
    """The context to use: `context` tokens must fit the model's own (beyond it its rotary tables end),
    except the command's `default`, which shrinks to fit. With a text (perplexity), only a text that fills
    a chunk is refused: a shorter one is its own error, said later. With bundle_only, anything but a
    bundle passes (its command says what is wrong with it)."""
    path = Path(path).expanduser()
    if bundle_only and not is_bundle(path):
        return context
    source = open_model(path)
    limit = source.config.max_position_embeddings
    if context <= limit or context == default:
        return min(context, limit)
    if text is not None:
        from flashllm.measure.perplexity import load_text_ids

        if source.tokenizer is None or len(load_text_ids(text, source.tokenizer, max_tokens)[0]) < context:
            return context
    raise FlashLLMError(f"--context {context}: the model's context holds {limit} tokens")
