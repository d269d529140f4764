"""The on-flash bundle: manifest schema, the streaming writer behind `convert`, the reader, and verify.

A bundle folder holds:
  manifest.json           format version, family + config, dtype, layout, sizes, checksums, source identity
  resident.safetensors    embeddings, attention, norms, final norm, LM head, FFN output biases
  ffn/layer_NNN.bin       one file per layer of fixed-size neuron records
  tokenizer.json (+ tokenizer_config.json)

Bundled layout: record i = [gate row i | up row i | down column i] (gated) or [up row i | down column i |
up bias i] (ReLU), packed back to back from offset 0, so one read fetches all a neuron needs. Split
layout (the paper's unbundled baseline): gate/up rows (+ bias) in one region, down columns in another.
Layer files start block-aligned and are padded to the alignment at the end, not per record.
"""

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

from flashllm.engine import DTYPES as DTYPE_NAMES, parse_dtype
from flashllm.errors import FlashLLMError
from flashllm.flash import RecordRegion
from flashllm.models.common import FFNSpec

FORMAT = "flashllm-bundle"
FORMAT_VERSION = 1
ALIGNMENT = 4096
MANIFEST = "manifest.json"
RESIDENT = "resident.safetensors"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
CHUNKED = ("embed.weight", "lm_head.weight", "pos_embed.weight")
CHUNK_VALUES = 8 << 20  # values per chunk of a chunked tensor (32 MB as float32)
RECORD_PARTS = {"gate": "ffn.gate.weight", "up": "ffn.up.weight", "down": "ffn.down.weight", "up_bias": "ffn.up.bias"}


def is_record_tensor(name: str) -> bool:
    return name.startswith("layers.") and name.split(".", 2)[2] in RECORD_PARTS.values()


def _align(n: int, alignment: int = ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


def region_plan(spec: FFNSpec, layout: str, itemsize: int) -> list[dict]:
    """The regions of one layer file: name, offset, stride, count, and where each part sits in a record."""
    groups = [[name for name, _ in spec.parts]] if layout == "bundled" else \
        [[n for n, _ in spec.parts if n != "down"], ["down"]]
    widths = dict(spec.parts)
    regions, offset = [], 0
    for index, names in enumerate(groups):
        parts, cursor = [], 0
        for name in names:
            parts.append({"name": name, "offset": cursor, "values": widths[name]})
            cursor += widths[name] * itemsize
        regions.append({"name": "bundle" if layout == "bundled" else ("gate_up" if index == 0 else "down"),
                        "offset": offset, "stride": cursor, "count": spec.n_ff, "parts": parts})
        offset = _align(offset + cursor * spec.n_ff)
    return regions


# -- writing ---------------------------------------------------------------------------------------

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


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


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
    from flashllm.sources import open_source

    start = time.perf_counter()
    if layout not in ("bundled", "split"):
        raise FlashLLMError(f"unknown layout {layout!r} (choose from bundled, split)")
    torch_dtype = parse_dtype(dtype)
    source, out = Path(source).expanduser(), Path(out).expanduser()
    _check_out(source, out, force)
    src = open_source(source)  # a bundle is a source too: converting it changes layout or dtype
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
        "resident": {"file": RESIDENT, "bytes": resident_bytes, "sha256": _hash_file(folder / RESIDENT)},
        "ffn": {"gated": spec.gated, "activation": spec.activation, "d": spec.d, "n_ff": spec.n_ff,
                "has_up_bias": spec.has_up_bias, "record_parts": [list(p) for p in spec.parts],
                "layers": layers},
        "sizes": {"resident_bytes": resident_bytes, "ffn_bytes": ffn_bytes, "ffn_useful_bytes": useful,
                  "padding_bytes": ffn_bytes - useful, "total_bytes": resident_bytes + ffn_bytes},
    }


# -- reading ---------------------------------------------------------------------------------------

def is_bundle(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).exists()


class Bundle:
    """A bundle folder opened by its manifest (never by its name)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            self.manifest = json.loads((self.folder / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise FlashLLMError(f"{self.folder}: unreadable manifest ({e})") from None
        if self.manifest.get("format") != FORMAT:
            raise FlashLLMError(f"{self.folder}: not a flashllm bundle")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise FlashLLMError(f"{self.folder}: bundle format {self.manifest.get('format_version')} is not "
                                f"supported (this flashllm reads {FORMAT_VERSION}); convert again")
        from flashllm.models import get_family

        self.family = get_family(self.manifest["family"])
        self.config = self.family.config.from_hf(self.manifest["config"])
        self.spec = self.family.model.ffn_spec(self.config)
        self.dtype = DTYPE_NAMES[self.manifest["dtype"]]
        self.itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.layout = self.manifest["layout"]

    @property
    def layers(self) -> list[dict]:
        return self.manifest["ffn"]["layers"]

    def layer_path(self, layer: int) -> Path:
        return self.folder / self.layers[layer]["file"]

    def regions(self, layer: int) -> list[tuple[RecordRegion, list[dict]]]:
        """Each region of a layer as a RecordRegion (for FlashReader) with its parts."""
        path = self.layer_path(layer)
        return [(RecordRegion(path, r["offset"], r["stride"], r["count"], f"layer {layer}"), r["parts"])
                for r in self.layers[layer]["regions"]]

    def _resident_header(self) -> tuple[dict, int]:
        from flashllm.sources.hf import read_header

        path = self.folder / RESIDENT
        try:
            return read_header(path)
        except (OSError, ValueError) as e:
            raise FlashLLMError(f"{path}: unreadable resident weights ({e}); run `flashllm verify`") from None

    def resident_tensors(self, skip: tuple[str, ...] = ()):
        """(name, tensor) read with pread, so no memory map's pages linger in our resident set."""
        from flashllm.sources.hf import tensor_loader

        path = self.folder / RESIDENT
        header, data_start = self._resident_header()
        for name, entry in header.items():
            if name != "__metadata__" and name not in skip:
                yield name, tensor_loader(path, data_start, name, entry)(None)

    def embedding_rows(self) -> tuple[RecordRegion, torch.dtype] | None:
        """The input embedding table as records of one row each, for reading only the rows of the
        tokens at hand; None where the table is also the LM head (tied), which needs all of it."""
        from flashllm.sources.hf import SAFETENSORS_DTYPES

        if getattr(self.config, "tie_word_embeddings", True):
            return None
        header, data_start = self._resident_header()
        entry = header.get("embed.weight")
        if entry is None or len(entry["shape"]) != 2:
            return None
        begin, end = entry["data_offsets"]
        rows = entry["shape"][0]
        return RecordRegion(self.folder / RESIDENT, data_start + begin, (end - begin) // rows, rows, "embeddings"), \
            SAFETENSORS_DTYPES[entry["dtype"]]

    @property
    def resident_bytes(self) -> int:
        """Bytes of the resident tensors (the file less its header)."""
        header, _ = self._resident_header()
        return sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k != "__metadata__")

    def split_records(self, records: torch.Tensor, parts: list[dict]) -> dict[str, torch.Tensor]:
        """records: [n, stride] uint8 -> {part: [n, values]} in the bundle dtype (views, no copy)."""
        out = {}
        for p in parts:
            lo = p["offset"]
            out[p["name"]] = records[:, lo:lo + p["values"] * self.itemsize].view(self.dtype)
        return out

    def dense_ffn(self, layer: int) -> dict[str, torch.Tensor]:
        """All records of a layer read back into dense matrices (canonical names)."""
        weights = {}
        for region, parts in self.regions(layer):
            with open(region.path, "rb") as f:
                f.seek(region.offset)
                blob = f.read(region.stride * region.count)
            if len(blob) != region.stride * region.count:
                raise FlashLLMError(f"layer {layer}: {region.path} is truncated; run `flashllm verify`")
            records = torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(region.count, region.stride)
            for name, rows in self.split_records(records, parts).items():
                tensor = rows.T.contiguous() if name == "down" else rows.contiguous()  # down back to [d, n_ff]
                weights[f"layers.{layer}.{RECORD_PARTS[name]}"] = tensor.squeeze(1) if name == "up_bias" else tensor
        return weights


def open_bundle_source(folder: Path):
    """A bundle as a Source, so the dense engine runs from it exactly as from the checkpoint."""
    from flashllm.sources import Source
    from flashllm.tokenizer import Tokenizer

    bundle = Bundle(folder)

    def tensors():
        def whole(tensor):
            return lambda rows: tensor if rows is None else tensor[rows]

        for name, tensor in bundle.resident_tensors():
            yield name, tuple(tensor.shape), whole(tensor)
        for layer in range(bundle.config.num_hidden_layers):
            for name, tensor in bundle.dense_ffn(layer).items():
                yield name, tuple(tensor.shape), whole(tensor)

    source = Source(bundle.folder, "bundle", bundle.family, bundle.config, Tokenizer.from_folder(bundle.folder),
                    tensors, bundle.manifest["sizes"]["total_bytes"])
    return source


def verify(folder: Path, progress: Callable[[int, int, str], None] | None = None) -> list[str]:
    """Re-hash every file against the manifest; returns the problems found (empty when intact)."""
    bundle = Bundle(folder)
    files = [(bundle.manifest["resident"], "resident weights")] + \
        [(layer, f"layer {i}") for i, layer in enumerate(bundle.layers)]
    problems = []
    for done, (entry, label) in enumerate(files, 1):
        path = bundle.folder / entry["file"]
        if not path.exists():
            problems.append(f"{label}: {entry['file']} is missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{label}: {entry['file']} has {path.stat().st_size} bytes, expected {entry['bytes']}")
        elif _hash_file(path) != entry["sha256"]:
            problems.append(f"{label}: {entry['file']} checksum mismatch")
        if progress:
            progress(done, len(files), label)
    return problems


def info(folder: Path) -> dict:
    """A summary of a bundle for `flashllm info`."""
    bundle = Bundle(folder)
    m = bundle.manifest
    sizes = m["sizes"]
    first = m["ffn"]["layers"][0]["regions"]
    return {
        "folder": str(bundle.folder), "family": m["family"], "model_type": m["model_type"], "dtype": m["dtype"],
        "layout": m["layout"], "layers": bundle.config.num_hidden_layers, "d": m["ffn"]["d"],
        "n_ff": m["ffn"]["n_ff"], "record_parts": m["ffn"]["record_parts"],
        "record_bytes": sum(r["stride"] for r in first), "resident_bytes": sizes["resident_bytes"],
        "ffn_bytes": sizes["ffn_bytes"], "total_bytes": sizes["total_bytes"],
        "padding_bytes": sizes["padding_bytes"], "padding_percent": 100 * sizes["padding_bytes"] / sizes["ffn_bytes"],
        "source": m["source"],
    }
