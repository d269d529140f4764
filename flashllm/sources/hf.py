"""A Hugging Face folder: config.json, model.safetensors (or shards with an index), tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path

from flashllm.errors import FlashLLMError
from flashllm.models import build_config, get_family
from flashllm.sources import Source
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
        from safetensors import safe_open

        for shard in shards:
            try:
                with safe_open(str(shard), framework="pt") as f:
                    for name in f.keys():
                        yield name, (lambda f=f, name=name: _load(f, shard, name))
            except FlashLLMError:
                raise
            except Exception as e:  # safetensors raises its own error types for damaged files
                raise FlashLLMError(f"{shard}: not a readable safetensors file ({e})") from None

    size = sum(s.stat().st_size for s in shards)
    return Source(folder, "hf", family, config, tokenizer, tensors, size)


def _load(f, shard: Path, name: str):
    try:
        return f.get_tensor(name)
    except Exception as e:
        raise FlashLLMError(f"{shard}: tensor {name} is unreadable ({e})") from None


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
