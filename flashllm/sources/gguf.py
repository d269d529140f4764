"""A GGUF file, read through the `gguf` package and dequantized one tensor at a time."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from flashllm.errors import FlashLLMError
from flashllm.models import get_family
from flashllm.sources.base import NameTable, Source
from flashllm.sources.checks import check_gguf, check_gguf_config
from flashllm.sources.gguf_quant import GGUFTensor, precision_class, read_rows, transpose_requantize
from flashllm.tokenizer import Tokenizer

GGUF_MAGIC = b"GGUF"


def read_metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # an odd field type we do not need
            continue
    return meta


def _loader(path: Path, t):
    """Dequantize a tensor (or a slice of its rows), reading its bytes with pread rather than through
    the reader's memory map, whose touched pages would count against our memory."""
    from gguf.quants import dequantize

    rows_total = t.data.shape[0]
    row_bytes = t.data.strides[0] if t.data.ndim > 1 else t.data.nbytes

    def load(rows: slice | None = None) -> torch.Tensor:
        first, last = (0, rows_total) if rows is None or t.data.ndim == 1 else (rows.start, rows.stop)
        n_bytes = (last - first) * row_bytes if t.data.ndim > 1 else t.data.nbytes
        with open(path, "rb") as f:
            blob = os.pread(f.fileno(), n_bytes, t.data_offset + first * row_bytes)
        raw = np.frombuffer(blob, dtype=t.data.dtype).reshape(last - first, *t.data.shape[1:]) \
            if t.data.ndim > 1 else np.frombuffer(blob, dtype=t.data.dtype)
        try:
            array = dequantize(raw, t.tensor_type)
        except Exception as e:
            raise FlashLLMError(f"{path}: tensor {t.name} cannot be dequantized ({e})") from None
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not array.flags.writeable:
            array = array.copy()
        return torch.from_numpy(array)

    return load


def open_gguf(path: Path) -> Source:
    import gguf

    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise FlashLLMError(f"{path}: not a GGUF file (and not a folder)")
    try:
        reader = gguf.GGUFReader(str(path))
        if reader.tensors:
            last = max(reader.tensors, key=lambda t: t.data_offset)
            if last.data_offset + last.n_bytes > path.stat().st_size:
                raise ValueError("tensor data beyond end of file")
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on damaged files
        raise FlashLLMError(f"{path}: damaged or truncated GGUF file ({e})") from None
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    family = get_family(arch)
    names = {t.name for t in reader.tensors}
    shapes = {t.name: tuple(reversed([int(n) for n in t.shape])) for t in reader.tensors}
    check_gguf(path, meta, arch, shapes)  # types and ranges of the metadata, block count against the tensors
    try:
        config = family.config.from_gguf(meta, arch, names)
    except (TypeError, ValueError, KeyError) as e:
        raise FlashLLMError(f"{path}: GGUF metadata does not describe a usable {arch} model ({e})") from None
    check_gguf_config(path, config, family, shapes)  # how the values relate; every tensor's shape
    try:
        tokenizer = Tokenizer.from_gguf(meta) if "tokenizer.ggml.tokens" in meta else None
    except FlashLLMError:
        raise
    except Exception as e:  # the tokenizers library raises its own types (a merge of tokens not in the vocabulary)
        raise FlashLLMError(f"{path}: the GGUF tokenizer cannot be built ({e})") from None
    def tensors():
        for t in reader.tensors:
            yield t.name, tuple(reversed([int(n) for n in t.shape])), _loader(path, t)

    fixup = None
    if family.gguf_fixup is not None:
        fixup = lambda canonical, tensor: family.gguf_fixup(config, arch, canonical, tensor)  # noqa: E731
    table, raw, precisions = NameTable(family.gguf_names), {}, {}
    for t in reader.tensors:
        canonical = table.map(t.name)
        if canonical is not None and len(t.shape) == 2:
            try:
                precisions[canonical] = precision_class(t.tensor_type)
                raw[canonical] = GGUFTensor.from_reader(path, t)
            except FlashLLMError:
                continue  # a type we only dequantize: it converts through float

    def quantized(canonical: str, kind: str, rows: slice | None, columns: bool):
        """Rows straight from the file's blocks: Q4_x -> int4 and Q8_0/Q5_0 -> int8 keep their grid."""
        tensor = raw.get(canonical)
        if tensor is None or precisions[canonical] == "float16":
            return None
        return transpose_requantize(tensor, kind) if columns else read_rows(tensor, rows, kind)

    return Source(path, "gguf", family, config, tokenizer, tensors, path.stat().st_size, fixup, meta,
                  precisions, quantized)
