"""A Hugging Face folder: config.json, model.safetensors (or shards with an index), tokenizer.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from flashllm.errors import FlashLLMError
from flashllm.models import build_config, get_family
from flashllm.sources.base import Source
from flashllm.tokenizer import Tokenizer


def open_hf(folder: Path) -> Source:
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FlashLLMError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        hf_config = json.loads(config_path.read_text())
    except ValueError as e:
        raise FlashLLMError(f"{config_path}: not valid JSON ({e})") from None
    if "model_type" not in hf_config:
        raise FlashLLMError(f"{config_path}: no model_type")
    family = get_family(hf_config["model_type"])
    config = build_config(family, hf_config)
    shards = _shards(folder)
    for shard in shards:
        _check_header(shard)
    tokenizer = Tokenizer.from_folder(folder, hf_config)

    def tensors():
        for shard in shards:
            header, data_start = read_header(shard)
            for name, entry in header.items():
                if name != "__metadata__":
                    yield name, tuple(entry["shape"]), tensor_loader(shard, data_start, name, entry)

    size = sum(s.stat().st_size for s in shards)
    return Source(folder, "hf", family, config, tokenizer, tensors, size)


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def tensor_loader(shard: Path, data_start: int, name: str, entry: dict):
    """Read a tensor (or a slice of its rows) with pread: no memory map whose pages would stay resident."""
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise FlashLLMError(f"{shard}: tensor {name} has unsupported dtype {entry['dtype']}")
    dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"]
    begin, end = entry["data_offsets"]

    def load(rows: slice | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """out: a tensor of the right shape and dtype to read into (reused across calls), else a new one."""
        lo, hi, out_shape = begin, end, shape
        if rows is not None:
            row_bytes = (end - begin) // shape[0]
            lo, hi = begin + rows.start * row_bytes, begin + rows.stop * row_bytes
            out_shape = [rows.stop - rows.start, *shape[1:]]
        fits = out is not None and out.dtype == dtype and list(out.shape) == list(out_shape) and out.is_contiguous()
        tensor = out if fits else torch.empty(out_shape, dtype=dtype)
        if hi > lo:  # straight into the tensor's memory: no intermediate copy
            with open(shard, "rb") as f:
                got = os.preadv(f.fileno(), [tensor.view(-1).view(torch.uint8).numpy()], data_start + lo)
            if got != hi - lo:
                raise FlashLLMError(f"{shard}: tensor {name} is truncated")
        return tensor

    return load


def _shards(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise FlashLLMError(f"{index}: not a safetensors index ({e})") from None
        missing = [f for f in files if not (folder / f).exists()]
        if missing:
            raise FlashLLMError(f"{folder}: shard {missing[0]} named in the index is missing")
        return [folder / f for f in files]
    raise FlashLLMError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def read_header(shard: Path) -> tuple[dict, int]:
    with open(shard, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def _check_header(shard: Path) -> None:
    """Catch a truncated file before streaming: the header's offsets must fit in the file."""
    size = shard.stat().st_size
    try:
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length beyond end of file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError) as e:
        raise FlashLLMError(f"{shard}: not a valid safetensors file ({e})") from None
    if 8 + n + end > size:
        raise FlashLLMError(f"{shard}: truncated: needs {8 + n + end} bytes, has {size}")
