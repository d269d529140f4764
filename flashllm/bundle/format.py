"""The on-flash bundle format: names, alignment, the regions of a layer file and the typed record layout.

A bundle folder holds:
  manifest.json           format version, family + config, dtype, layout, sizes, checksums, source identity
  resident.safetensors    embeddings, attention, norms, final norm, LM head, FFN output biases
  ffn/layer_NNN.bin       one file per layer of fixed-size neuron records
  tokenizer.json (+ tokenizer_config.json)

Bundled layout: record i = [gate row i | up row i | down column i] (gated) or [up row i | down column i |
up bias i] (ReLU), packed back to back from offset 0, so one read fetches all a neuron needs. Split
layout (the paper's unbundled baseline): gate/up rows (+ bias) in one region, down columns in another.
Layer files start block-aligned and are padded to the alignment at the end, not per record.

Quantized bundles (format 2): a part may be stored as int4 or int8 rows (models/qrows.py: groups of 32
values, each row [codes | scales (| mins)] self-contained), named by the part's "kind" in the manifest;
a quantized resident tensor is a uint8 [rows, row bytes] tensor of the same record form, its kind in
manifest["resident"]["kinds"]. Records are then no longer multiples of 512 bytes: the reader aligns
each request to the device's logical block itself and reads through neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flashllm.disk.reader import RecordRegion
from flashllm.models.ffn import FFNSpec
from flashllm.models.qrows import QRows, from_records, row_bytes

FORMAT = "flashllm-bundle"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: float parts only
ALIGNMENT = 4096
MANIFEST = "manifest.json"
RESIDENT = "resident.safetensors"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8"}
QUANTIZED = ("int4", "int8")
CHUNKED = ("embed.weight", "lm_head.weight", "pos_embed.weight")
CHUNK_VALUES = 8 << 20  # values per chunk of a chunked tensor (32 MB as float32)
RECORD_PARTS = {"gate": "ffn.gate.weight", "up": "ffn.up.weight", "down": "ffn.down.weight", "up_bias": "ffn.up.bias"}


def is_record_tensor(name: str) -> bool:
    return name.startswith("layers.") and name.split(".", 2)[2] in RECORD_PARTS.values()


def _align(n: int, alignment: int = ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


def part_bytes(values: int, kind: str | None, itemsize: int) -> int:
    """Bytes of one part of a record: quantized rows in their record form, else values of the float dtype."""
    return row_bytes(kind, values) if kind in QUANTIZED else values * itemsize


def region_plan(spec: FFNSpec, layout: str, itemsize: int, kinds: dict[str, str] | None = None) -> list[dict]:
    """The regions of one layer file: name, offset, stride, count, and where each part sits in a record.
    kinds: part -> "int4" / "int8" for quantized parts (the rest are in the float dtype)."""
    kinds = kinds or {}
    groups = [[name for name, _ in spec.parts]] if layout == "bundled" else \
        [[n for n, _ in spec.parts if n != "down"], ["down"]]
    widths = dict(spec.parts)
    regions, offset = [], 0
    for index, names in enumerate(groups):
        parts, cursor = [], 0
        for name in names:
            part = {"name": name, "offset": cursor, "values": widths[name]}
            if kinds.get(name) in QUANTIZED:
                part["kind"] = kinds[name]
            parts.append(part)
            cursor += part_bytes(widths[name], kinds.get(name), itemsize)
        regions.append({"name": "bundle" if layout == "bundled" else ("gate_up" if index == 0 else "down"),
                        "offset": offset, "stride": cursor, "count": spec.n_ff, "parts": parts})
        offset = _align(offset + cursor * spec.n_ff)
    return regions


@dataclass(frozen=True)
class PartColumns:
    """Where one part (gate, up, down, up_bias) sits in a row of records read from flash: bytes
    [start, stop) of the row, `values` values of the bundle dtype."""

    name: str
    start: int
    stop: int
    values: int
    kind: str | None = None  # "int4" / "int8": quantized rows; None: values of the bundle's float dtype


@dataclass(frozen=True)
class RecordLayout:
    """One layer's records as the engine reads and caches them: the regions read (each fills its own
    columns of a row, in order) and each part's columns in that row. Computed once at load, so the hot
    path never touches the manifest."""

    regions: tuple[RecordRegion, ...]
    parts: tuple[PartColumns, ...]
    dtype: torch.dtype

    @property
    def record_bytes(self) -> int:
        return sum(region.stride for region in self.regions)

    @property
    def quantized(self) -> bool:
        return any(p.kind is not None for p in self.parts)

    def column(self, name: str) -> PartColumns:
        return next(p for p in self.parts if p.name == name)

    def split(self, rows: torch.Tensor) -> dict[str, torch.Tensor | QRows]:
        """rows: [n, record_bytes] uint8 -> {part: [n, values]} in the bundle dtype, or QRows for quantized
        parts (views, no copy)."""
        return {p.name: from_records(rows[:, p.start:p.stop], p.kind, p.values) if p.kind else
                rows[:, p.start:p.stop].view(self.dtype) for p in self.parts}


def record_layout(path: Path, regions: list[dict], layer: int, dtype: torch.dtype,
                  parts: tuple[str, ...] | None = None) -> RecordLayout:
    """The layout of the manifest's `regions` of one layer file that hold any of `parts` (None: all)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    chosen, columns, column = [], [], 0
    for r in regions:
        names = [p["name"] for p in r["parts"]]
        if parts is not None and not set(names) & set(parts):
            continue
        chosen.append(RecordRegion(path, r["offset"], r["stride"], r["count"], f"layer {layer}"))
        for p in r["parts"]:
            start = column + p["offset"]
            kind = p.get("kind")
            columns.append(PartColumns(p["name"], start, start + part_bytes(p["values"], kind, itemsize), p["values"],
                                       kind))
        column += r["stride"]
    return RecordLayout(tuple(chosen), tuple(columns), dtype)
