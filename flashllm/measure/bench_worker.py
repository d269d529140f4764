"""One bench strategy in its own process (so its peak RSS is its own): load, say hello, then answer one
JSON line per prompt with the teacher-forced decode of its continuation (engine.generate.score).

    python -m flashllm.measure.bench_worker CONFIG_JSON
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from flashllm.bundle.format import RESIDENT
from flashllm.bundle.reader import Bundle
from flashllm.disk.system import current_rss, kernel_read_bytes, peak_rss
from flashllm.engine.flash_model import FlashModel, FlashSettings
from flashllm.engine.generate import load_dense, score
from flashllm.errors import FlashLLMError
from flashllm.models import Transformer
from flashllm.models.ffn import ffn_over_rows, neuron_coefficients
from flashllm.models.qrows import from_records
from flashllm.sources.hf import read_header

_PHASES = ("io", "memory", "predictor")


class _Engine:
    """A model whose providers are set, and the counters bench reads between decode steps."""

    planned_bytes = 0
    overhead_bytes: int | None = None

    def __init__(self, model: Transformer):
        self.model = model

    def counters(self) -> dict:
        return {"io": 0.0, "memory": 0.0, "predictor": 0.0, "read": 0, "needed": 0, "hit": 0}

    def score(self, prompt: list[int], continuation: list[int]) -> dict:
        marks, kernel = [], []

        def mark() -> None:
            marks.append(self.counters())
            kernel.append(kernel_read_bytes())

        result = score(self.model, prompt, continuation, on_step=mark)
        first, last = marks[0], marks[-1]
        steps = list(zip(marks, marks[1:]))
        out = {"steps_ms": [1000 * s for s in result.step_seconds], "nll": result.nll, "argmax": result.argmax}
        for phase in _PHASES:
            out[f"{phase}_ms"] = [1000 * (after[phase] - before[phase]) for before, after in steps]
        out["bytes_read"] = last["read"] - first["read"]
        out["kernel_bytes_read"] = kernel[-1] - kernel[0] if None not in (kernel[0], kernel[-1]) else None
        out["needed"], out["hits"] = last["needed"] - first["needed"], last["hit"] - first["hit"]
        return out


class _FlashEngine(_Engine):
    def __init__(self, flash: FlashModel):
        super().__init__(flash.model)
        self.flash = flash
        self.planned_bytes = flash.plan.planned_bytes
        self.overhead_bytes = flash.overhead_bytes

    def counters(self) -> dict:
        return self.flash.marks()


class _MmapEngine(_Engine):
    """Dense compute straight over an mmap of the bundle: the page cache decides what is in DRAM."""

    def __init__(self, folder: Path):
        bundle = Bundle(folder)
        header, data_start = read_header(folder / RESIDENT)
        resident = np.memmap(folder / RESIDENT, dtype=np.uint8, mode="r")
        weights = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            lo, hi = entry["data_offsets"]
            raw = torch.from_numpy(resident[data_start + lo:data_start + hi])
            if name in bundle.kinds:  # quantized rows, in record form: views of the mapped bytes
                k = bundle.config.expected_shapes()[name][1]
                weights[name] = from_records(raw.view(entry["shape"]), bundle.kinds[name], k)
            else:
                weights[name] = raw.view(bundle.dtype).view(entry["shape"])
        # computed on the mapped rows as they are (no kernel-form copy in anonymous memory: the page cache
        # alone decides what is in DRAM, as for llama.cpp without repacking)
        model = bundle.family.model(bundle.config, weights, bundle.dtype, compute_form=False)
        parts = []
        for layer in range(bundle.config.num_hidden_layers):
            layer_parts = {}
            for region in bundle.layers[layer]["regions"]:  # each region mapped on its own: no copy
                layout = bundle.record_layout(layer, tuple(p["name"] for p in region["parts"]))
                r = layout.regions[0]
                mapped = np.memmap(r.path, dtype=np.uint8, mode="r", offset=r.offset, shape=(r.count, r.stride))
                layer_parts |= layout.split(torch.from_numpy(mapped))
            parts.append(layer_parts)
        spec = bundle.spec

        def ffn(layer: int, x: torch.Tensor) -> torch.Tensor:
            p = parts[layer]
            bias = p["up_bias"][:, 0] if "up_bias" in p else None
            a = neuron_coefficients(spec, x, p.get("gate"), p["up"], bias)  # [T, n_ff]
            return ffn_over_rows(a, p["down"], x.dtype)

        model.use_ffn(ffn)
        super().__init__(model)

    def counters(self) -> dict:
        """Page faults are this engine's reads: the kernel's count is its byte count."""
        return dict(super().counters(), read=kernel_read_bytes() or 0)


def build_engine(config: dict) -> _Engine:
    warnings.filterwarnings("ignore")  # read-only mmap tensors warn once; nothing writes to them
    folder = Path(config["bundle"])
    if config["kind"] == "resident":
        engine = _Engine(load_dense(folder, Bundle(folder).dtype).model)
        engine.planned_bytes = Bundle(folder).manifest["sizes"]["total_bytes"]
        return engine
    if config["kind"] == "mmap":
        return _MmapEngine(folder)
    fields = dict(config["settings"], window=config["window"], threads=config["threads"],
                  merge_gap_bytes=config["merge_gap_bytes"])
    flash = FlashModel.open(folder, config["budget"], FlashSettings(**fields), config["max_tokens"], config["prefill"])
    torch.set_grad_enabled(False)
    return _FlashEngine(flash)


def main(config: dict) -> None:
    """Load one strategy, say hello, then answer one JSON line per prompt."""
    overhead = current_rss()
    try:
        engine = build_engine(config)
    except FlashLLMError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return
    if engine.overhead_bytes is not None:  # the engine's own, measured as generate does
        overhead = engine.overhead_bytes
    print(json.dumps({"overhead_bytes": overhead, "planned_bytes": engine.planned_bytes}), flush=True)
    for line in sys.stdin:
        prompt = json.loads(line)
        result = engine.score(prompt["prompt"], prompt["continuation"])
        result["peak_rss_bytes"] = peak_rss()
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
