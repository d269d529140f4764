"""Readers of input checkpoints: a Hugging Face folder or a GGUF file, yielding canonical tensors.
Never reads a bundle (bundle.reader.open_model adds that)."""

from __future__ import annotations

from pathlib import Path

from flashllm.errors import FlashLLMError
from flashllm.sources.base import NameTable, Source, hash_files
from flashllm.sources.gguf import open_gguf
from flashllm.sources.hf import open_hf


def open_source(path: str | Path) -> Source:
    """Open a Hugging Face folder or a GGUF file (a known model name is resolved by the caller)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FlashLLMError(f"{path}: no such file or folder")
    return open_hf(path) if path.is_dir() else open_gguf(path)


__all__ = ["NameTable", "Source", "hash_files", "open_source"]
