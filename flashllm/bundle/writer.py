"""`convert`: stream a checkpoint into a bundle folder, one tensor at a time, atomically."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from flashllm.bundle.format import (ALIGNMENT, CHUNK_VALUES, CHUNKED, FORMAT, FORMAT_VERSION, MANIFEST, QUANTIZED,
                                    RECORD_PARTS, RESIDENT, SAFETENSORS_DTYPES, _align, is_record_tensor, region_plan)
from flashllm.bundle.reader import open_model
from flashllm.errors import FlashLLMError
from flashllm.models import DTYPES, parse_dtype
from flashllm.models.qrows import GROUP as QROW_GROUP, QRows, row_bytes, to_records
from flashllm.models.ffn import FFNSpec
from flashllm.sources import hash_files

class ResidentWriter:
    """A safetensors file written tensor by tensor at offsets fixed up front (shapes are known from the
    config), so the resident weights never need to be gathered in memory."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype]):
        header, offset = {}, 0
        for name in sorted(shapes):
            itemsize = torch.empty((), dtype=dtypes[name]).element_size()
            nbytes = int(np.prod(shapes[name], dtype=np.int64)) * itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtypes[name]], "shape": list(shapes[name]),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.data_start = 8 + len(blob)
        self.header, self.dtypes, self.total = header, dtypes, self.data_start + offset
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)
        self.file.truncate(self.total)

    def write(self, name: str, tensor: torch.Tensor | QRows, first_row: int = 0) -> None:
        """Write a tensor (quantized rows in their record form), or rows first_row.. of it (the rest
        arrives in later calls)."""
        start, end = self.header[name]["data_offsets"]
        rows = self.header[name]["shape"][0] if self.header[name]["shape"] else 1
        tensor = to_records(tensor) if isinstance(tensor, QRows) else tensor
        data = tensor.to(self.dtypes[name]).contiguous().view(torch.uint8).numpy()
        os.pwrite(self.file.fileno(), memoryview(data).cast("B"), self.data_start + start + first_row * ((end - start) // rows))

    def close(self) -> None:
        self.file.close()


def write_layer(path: Path, spec: FFNSpec, layout: str, parts: dict[str, torch.Tensor | QRows], dtype: torch.dtype,
                kinds: dict[str, str] | None = None) -> dict:
    """One layer file of neuron records; returns its manifest entry (regions, bytes, sha256). parts: float
    tensors in the checkpoint's shapes (down [d, n_ff]), or QRows of `kinds` (down as its n_ff columns)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    regions = region_plan(spec, layout, itemsize, kinds)

    def record_rows(name: str) -> torch.Tensor:  # [n_ff, part bytes] uint8
        part = parts[name]
        if isinstance(part, QRows):
            return to_records(part)
        rows = part.T if name == "down" else part.unsqueeze(1) if name == "up_bias" else part  # down -> [n_ff, d]
        return rows.to(dtype).contiguous().view(torch.uint8)

    digest = hashlib.sha256()
    written = 0
    with open(path, "wb") as f:
        for region in regions:
            if written < region["offset"]:
                pad = bytes(region["offset"] - written)
                f.write(pad)
                digest.update(pad)
                written += len(pad)
            records = torch.cat([record_rows(p["name"]) for p in region["parts"]], dim=1)  # [n_ff, stride]
            data = memoryview(records.contiguous().numpy()).cast("B")
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


WEIGHT_DTYPES = ("auto", "int4", "int8")  # besides the float dtypes


def weight_kinds(src, shapes: dict[str, tuple[int, ...]], dtype: str) -> dict[str, str]:
    """canonical name -> "int4" / "int8" for the matrices stored quantized (the rest: the float dtype).
    auto keeps each tensor's precision class in the source, never coarser: Q4_x -> int4, Q5_x/Q6_K/Q8_0 ->
    int8, float -> float16. A down projection from a quantized source becomes int8 columns, since its
    neuron columns cut across the file's blocks (requantized as int4 they would double its noise)."""
    if dtype not in WEIGHT_DTYPES:
        return {}
    kinds = {}
    for name, shape in shapes.items():
        if len(shape) != 2 or shape[1] % QROW_GROUP:
            continue
        kind = dtype if dtype != "auto" else src.precision_of(name)
        if dtype == "auto" and name.endswith("ffn.down.weight") and kind == "int4":
            kind = "int8"
        if kind in QUANTIZED:
            kinds[name] = kind
    return kinds


def convert(source: Path, out: Path, dtype: str = "auto", layout: str = "bundled", force: bool = False,
            progress: Callable[[int, int, str], None] | None = None) -> ConvertResult:
    """Stream a checkpoint into a bundle folder, atomically: a temporary sibling renamed at the end.
    dtype: auto (the source's own precision per tensor), int4, int8, or a float dtype for every tensor."""
    start = time.perf_counter()
    if layout not in ("bundled", "split"):
        raise FlashLLMError(f"unknown layout {layout!r} (choose from bundled, split)")
    if dtype not in WEIGHT_DTYPES:
        parse_dtype(dtype)  # a float dtype, or a one-line error naming the choices
    source, out = Path(source).expanduser(), Path(out).expanduser()
    _check_out(source, out, force)
    src = open_model(source)  # a bundle is a source too: converting it changes layout or dtype
    config, spec = src.config, src.family.model.ffn_spec(src.config)
    shapes = config.expected_shapes()
    kinds = weight_kinds(src, shapes, dtype)
    torch_dtype = parse_dtype(dtype) if dtype not in WEIGHT_DTYPES else torch.float16  # norms, biases, the rest
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    resident_shapes = {k: ((v[0], row_bytes(kinds[k], v[1])) if k in kinds else v)
                       for k, v in shapes.items() if not is_record_tensor(k)}
    resident_dtypes = {k: torch.uint8 if k in kinds else torch_dtype for k in resident_shapes}
    part_kinds = {_record_part(k)[1]: kind for k, kind in kinds.items() if is_record_tensor(k)}
    needed = _estimated_bytes(resident_shapes, resident_dtypes, spec, layout, itemsize, part_kinds,
                              config.num_hidden_layers)
    free = shutil.disk_usage(out.parent).free
    if needed * 1.02 + (64 << 20) > free:
        size = lambda n: f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"  # noqa: E731
        raise FlashLLMError(f"not enough free disk in {out.parent}: the bundle needs ~{size(needed)} and 64 MiB "
                            f"to spare, {size(free)} free")
    _remove_stale_temporaries(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        (tmp / "ffn").mkdir(parents=True)
        resident = ResidentWriter(tmp / RESIDENT, resident_shapes, resident_dtypes)
        layers: list[dict | None] = [None] * config.num_hidden_layers
        pending: dict[int, dict[str, torch.Tensor | QRows]] = {}
        layer_kinds: dict[int, dict[str, str]] = {}
        total = len(shapes)
        for done, (name, shape, load) in enumerate(src.streams(), 1):
            kind = kinds.get(name)
            if is_record_tensor(name):
                layer, part = _record_part(name)
                if kind is None:
                    pending.setdefault(layer, {})[part] = load(None).to(torch_dtype)
                else:  # gate/up rows, or the down projection's columns, in their record form
                    pending.setdefault(layer, {})[part] = src.quantized(name, kind, load, columns=part == "down")
                    layer_kinds.setdefault(layer, {})[part] = kind
                if set(pending[layer]) == {p for p, _ in spec.parts}:
                    path = tmp / "ffn" / f"layer_{layer:03d}.bin"
                    layers[layer] = write_layer(path, spec, layout, pending.pop(layer), torch_dtype,
                                                layer_kinds.pop(layer, {}))
            elif name in CHUNKED:  # vocab x d tables: a few MB at a time keeps peak memory low
                step = max(1, CHUNK_VALUES // int(np.prod(shape[1:])))
                for first in range(0, shape[0], step):
                    rows = slice(first, min(first + step, shape[0]))
                    resident.write(name, src.quantized(name, kind, load, rows) if kind else load(rows), first)
            else:
                resident.write(name, src.quantized(name, kind, load) if kind else load(None))
            if progress:
                progress(done, total, name)
        resident.close()
        if src.tokenizer is not None:
            _save_tokenizer(src.tokenizer, tmp)
        manifest = _manifest(src, config, spec, torch_dtype, dtype, layout, layers, tmp,
                             {k: v for k, v in kinds.items() if not is_record_tensor(k)})
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


def _estimated_bytes(resident_shapes, resident_dtypes, spec: FFNSpec, layout: str, itemsize: int,
                     part_kinds: dict[str, str], n_layers: int) -> int:
    resident = sum(int(np.prod(shape)) * torch.empty((), dtype=resident_dtypes[k]).element_size()
                   for k, shape in resident_shapes.items())
    regions = region_plan(spec, layout, itemsize, part_kinds)
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


def _save_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizers library reports a failed write (a full disk) as a bare Exception naming the errno:
    made an OSError, so that it is the one-line "writing OUT failed" error like any other write."""
    try:
        tokenizer.save(folder)
    except OSError:
        raise
    except Exception as e:
        errno = re.search(r"\(os error (\d+)\)", str(e))
        if errno is None:
            raise
        raise OSError(int(errno[1]), os.strerror(int(errno[1]))) from e


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


def _manifest(src, config, spec: FFNSpec, dtype: torch.dtype, weights: str, layout: str, layers: list[dict],
              folder: Path, resident_kinds: dict[str, str]) -> dict:
    resident_bytes = (folder / RESIDENT).stat().st_size
    ffn_bytes = sum(layer["bytes"] for layer in layers)
    useful = sum(layer["useful_bytes"] for layer in layers)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": src.family.name,
        "model_type": config.model_type,
        "config": config.to_dict(),
        "dtype": next(name for name, t in DTYPES.items() if t == dtype),  # the float parts' dtype
        "weights": weights,  # what convert was asked for: auto, int4, int8 or a float dtype
        "layout": layout,
        "alignment": ALIGNMENT,
        "tokenizer": "tokenizer.json" if src.tokenizer is not None else None,
        "source": src.identity(with_hash=True),
        "resident": {"file": RESIDENT, "bytes": resident_bytes, "sha256": hash_files([folder / RESIDENT]),
                     "kinds": resident_kinds},
        "ffn": {"gated": spec.gated, "activation": spec.activation, "d": spec.d, "n_ff": spec.n_ff,
                "has_up_bias": spec.has_up_bias, "record_parts": [list(p) for p in spec.parts],
                "layers": layers},
        "sizes": {"resident_bytes": resident_bytes, "ffn_bytes": ffn_bytes, "ffn_useful_bytes": useful,
                  "padding_bytes": ffn_bytes - useful, "total_bytes": resident_bytes + ffn_bytes},
        # the other files convert wrote (the tokenizer's), so that verify covers every file
        "files": [{"file": path.name, "bytes": path.stat().st_size, "sha256": hash_files([path])}
                  for path in sorted(folder.iterdir()) if path.is_file() and path.name != RESIDENT],
    }


