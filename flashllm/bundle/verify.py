"""`verify` (re-hash every file against the manifest) and `info` (a bundle's summary)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from flashllm.bundle.reader import Bundle
from flashllm.sources import hash_files

def verify(folder: Path, progress: Callable[[int, int, str], None] | None = None) -> list[str]:
    """Re-hash every file against the manifest; returns the problems found (empty when intact)."""
    bundle = Bundle(folder, files=False)  # missing files and wrong sizes are this function's to report
    files = [(bundle.manifest["resident"], "resident weights")] + \
        [(layer, f"layer {i}") for i, layer in enumerate(bundle.layers)] + \
        [(entry, entry["file"]) for entry in bundle.manifest.get("files", [])] + _predictor_files(bundle.folder)
    problems = []
    for done, (entry, label) in enumerate(files, 1):
        path = bundle.folder / entry["file"]
        if not path.exists():
            problems.append(f"{label}: {entry['file']} is missing")
        elif entry["sha256"] is None:
            problems.append(f"{label}: predictors.json records no checksum for {entry['file']} (made by an older "
                            f"flashllm: run `flashllm train-predictor` again)")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{label}: {entry['file']} has {path.stat().st_size} bytes, expected {entry['bytes']}")
        elif hash_files([path]) != entry["sha256"]:
            problems.append(f"{label}: {entry['file']} checksum mismatch")
        if progress:
            progress(done, len(files), label)
    return problems


def _predictor_files(folder: Path) -> list[tuple[dict, str]]:
    """The predictors' weights with the size and checksum predictors.json records for them (train-predictor
    writes both; predictors.json itself is checked field by field when loaded)."""
    path = folder / "predictors.json"
    if not path.is_file():
        return []
    try:
        recorded = json.loads(path.read_text()).get("weights_file") or {}
    except (OSError, ValueError, AttributeError):
        recorded = {}
    entry = {"file": "predictors.safetensors", "bytes": None, "sha256": None}  # the name is fixed, never read
    if isinstance(recorded, dict) and isinstance(recorded.get("bytes"), int) and isinstance(recorded.get("sha256"), str):
        entry.update(bytes=recorded["bytes"], sha256=recorded["sha256"])
    return [(entry, "predictors")]


def info(folder: Path) -> dict:
    """A summary of a bundle for `flashllm info`."""
    bundle = Bundle(folder)
    m = bundle.manifest
    sizes = m["sizes"]
    first = m["ffn"]["layers"][0]["regions"]
    return {
        "folder": str(bundle.folder), "family": m["family"], "model_type": m["model_type"], "dtype": m["dtype"],
        "weights": m.get("weights", m["dtype"]), "part_kinds": bundle.part_kinds, "resident_kinds": bundle.kinds,
        "layout": m["layout"], "layers": bundle.config.num_hidden_layers, "d": m["ffn"]["d"],
        "n_ff": m["ffn"]["n_ff"], "record_parts": m["ffn"]["record_parts"],
        "record_bytes": sum(r["stride"] for r in first), "resident_bytes": sizes["resident_bytes"],
        "ffn_bytes": sizes["ffn_bytes"], "total_bytes": sizes["total_bytes"],
        "padding_bytes": sizes["padding_bytes"], "padding_percent": 100 * sizes["padding_bytes"] / sizes["ffn_bytes"],
        "source": m["source"],
    }
