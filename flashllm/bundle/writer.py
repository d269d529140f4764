"""`convert`: stream a checkpoint into a bundle folder, one tensor at a time, atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from flashllm.bundle.format import (ALIGNMENT, CHUNK_VALUES, CHUNKED, FORMAT, FORMAT_VERSION, MANIFEST, RECORD_PARTS,
                                    RESIDENT, SAFETENSORS_DTYPES, _align, is_record_tensor, region_plan)
from flashllm.bundle.reader import open_model
from flashllm.errors import FlashLLMError
from flashllm.models import parse_dtype
from flashllm.models.ffn import FFNSpec
from flashllm.sources import hash_files

class ResidentWriter:
    """A safetensors file written tensor by tensor at offsets fixed up front (shapes are known from the
    config), so the resident weights never need to be gathered in memory."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype):
        itemsize = torch.empty((), dtype=dtype).element_size()
        header, offset = {}, 0
        for name in sorted(shapes):
            nbytes = int(np.prod(shapes[name], dtype=np.int64)) * itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shapes[name]),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.data_start = 8 + len(blob)
        self.header, self.dtype, self.total = header, dtype, self.data_start + offset
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)
        self.file.truncate(self.total)

    def write(self, name: str, tensor: torch.Tensor, first_row: int = 0) -> None:
        """Write a tensor, or rows first_row.. of it (the rest arrives in later calls)."""
        start, end = self.header[name]["data_offsets"]
        rows = self.header[name]["shape"][0] if self.header[name]["shape"] else 1
        data = tensor.to(self.dtype).contiguous().view(torch.uint8).numpy()
        os.pwrite(self.file.fileno(), memoryview(data).cast("B"), self.data_start + start + first_row * ((end - start) // rows))

    def close(self) -> None:
        self.file.close()


def write_layer(path: Path, spec: FFNSpec, layout: str, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """One layer file of neuron records; returns its manifest entry (regions, bytes, sha256)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    regions = region_plan(spec, layout, itemsize)
    rows = {"gate": parts.get("gate"), "up": parts["up"], "down": parts["down"].T,  # down: [d, n_ff] -> [n_ff, d]
            "up_bias": parts["up_bias"].unsqueeze(1) if "up_bias" in parts else None}
    digest = hashlib.sha256()
    written = 0
    with open(path, "wb") as f:
        for region in regions:
            if written < region["offset"]:
                pad = bytes(region["offset"] - written)
                f.write(pad)
                digest.update(pad)
                written += len(pad)
            records = torch.cat([rows[p["name"]].to(dtype) for p in region["parts"]], dim=1)  # [n_ff, values]
            data = memoryview(records.contiguous().view(torch.uint8).numpy()).cast("B")
            f.write(data)
            digest.update(data)
            written += len(data)
        pad = bytes(_align(written) - written)
        f.write(pad)
        digest.update(pad)
        written += len(pad)
    useful = sum(r["stride"] * r["count"] for r in regions)
    return {"file": f"ffn/{path.name}", "bytes": written, "useful_bytes": useful, "sha256": digest.hexdigest(),
            "regions": regions}


@dataclass
class ConvertResult:
    out: Path
    seconds: float
    manifest: dict


def convert(source: Path, out: Path, dtype: str = "float16", layout: str = "bundled", force: bool = False,
            progress: Callable[[int, int, str], None] | None = None) -> ConvertResult:
    """Stream a checkpoint into a bundle folder, atomically: a temporary sibling renamed at the end."""
    start = time.perf_counter()
    if layout not in ("bundled", "split"):
        raise FlashLLMError(f"unknown layout {layout!r} (choose from bundled, split)")
    torch_dtype = parse_dtype(dtype)
    source, out = Path(source).expanduser(), Path(out).expanduser()
    _check_out(source, out, force)
    src = open_model(source)  # a bundle is a source too: converting it changes layout or dtype
    config, spec = src.config, src.family.model.ffn_spec(src.config)
    shapes = config.expected_shapes()
    resident_shapes = {k: v for k, v in shapes.items() if not is_record_tensor(k)}
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    needed = _estimated_bytes(shapes, spec, layout, itemsize, config.num_hidden_layers)
    free = shutil.disk_usage(out.parent).free
    if needed * 1.02 + (64 << 20) > free:
        raise FlashLLMError(f"not enough free disk in {out.parent}: the bundle needs ~{needed / 1e9:.2f} GB, "
                            f"{free / 1e9:.2f} GB free")
    _remove_stale_temporaries(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        (tmp / "ffn").mkdir(parents=True)
        resident = ResidentWriter(tmp / RESIDENT, resident_shapes, torch_dtype)
        layers: list[dict | None] = [None] * config.num_hidden_layers
        pending: dict[int, dict[str, torch.Tensor]] = {}
        total = len(shapes)
        for done, (name, shape, load) in enumerate(src.streams(), 1):
            if is_record_tensor(name):
                layer, part = _record_part(name)
                pending.setdefault(layer, {})[part] = load(None).to(torch_dtype)
                if set(pending[layer]) == {p for p, _ in spec.parts}:
                    path = tmp / "ffn" / f"layer_{layer:03d}.bin"
                    layers[layer] = write_layer(path, spec, layout, pending.pop(layer), torch_dtype)
            elif name in CHUNKED:  # vocab x d tables: a few MB at a time keeps peak memory low
                step = max(1, CHUNK_VALUES // int(np.prod(shape[1:])))
                for first in range(0, shape[0], step):
                    resident.write(name, load(slice(first, min(first + step, shape[0]))), first)
            else:
                resident.write(name, load(None))
            if progress:
                progress(done, total, name)
        resident.close()
        if src.tokenizer is not None:
            src.tokenizer.save(tmp)
        manifest = _manifest(src, config, spec, dtype, layout, layers, tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_tree(tmp)
        _install(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FlashLLMError(f"writing {out} failed: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertResult(out, time.perf_counter() - start, manifest)


def _record_part(name: str) -> tuple[int, str]:
    _, layer, rest = name.split(".", 2)
    part = next(p for p, tensor_name in RECORD_PARTS.items() if tensor_name == rest)
    return int(layer), part


def _estimated_bytes(shapes, spec: FFNSpec, layout: str, itemsize: int, n_layers: int) -> int:
    resident = sum(int(np.prod(s)) for k, s in shapes.items() if not is_record_tensor(k)) * itemsize
    regions = region_plan(spec, layout, itemsize)
    per_layer = _align(regions[-1]["offset"] + regions[-1]["stride"] * regions[-1]["count"])
    return resident + per_layer * n_layers


def _check_out(source: Path, out: Path, force: bool) -> None:
    if not source.exists():
        raise FlashLLMError(f"{source}: no such file or folder")
    src, dst = source.resolve(), out.resolve()
    if dst == src or (src.is_dir() and src in dst.parents):
        raise FlashLLMError(f"{out} is inside the source {source}; choose another output folder")
    if out.exists() and not force:
        raise FlashLLMError(f"{out} already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise FlashLLMError(f"{out} exists and is not a folder")
    parent = out.parent
    if not parent.exists():
        raise FlashLLMError(f"{parent}: no such folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FlashLLMError(f"{parent}: not writable")


def _remove_stale_temporaries(out: Path) -> None:
    """Leftovers of a convert killed with -9: their pid is gone, so nobody is writing them."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    for old in out.parent.glob(f".{out.name}.old-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)) and out.exists():
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an old OUT survives until the new one is complete."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _manifest(src, config, spec: FFNSpec, dtype: str, layout: str, layers: list[dict], folder: Path) -> dict:
    resident_bytes = (folder / RESIDENT).stat().st_size
    ffn_bytes = sum(layer["bytes"] for layer in layers)
    useful = sum(layer["useful_bytes"] for layer in layers)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": src.family.name,
        "model_type": config.model_type,
        "config": config.to_dict(),
        "dtype": dtype,
        "layout": layout,
        "alignment": ALIGNMENT,
        "tokenizer": "tokenizer.json" if src.tokenizer is not None else None,
        "source": src.identity(with_hash=True),
        "resident": {"file": RESIDENT, "bytes": resident_bytes, "sha256": hash_files([folder / RESIDENT])},
        "ffn": {"gated": spec.gated, "activation": spec.activation, "d": spec.d, "n_ff": spec.n_ff,
                "has_up_bias": spec.has_up_bias, "record_parts": [list(p) for p in spec.parts],
                "layers": layers},
        "sizes": {"resident_bytes": resident_bytes, "ffn_bytes": ffn_bytes, "ffn_useful_bytes": useful,
                  "padding_bytes": ffn_bytes - useful, "total_bytes": resident_bytes + ffn_bytes},
    }


