"""The FFN and embedding providers that read weights from flash.

Per token and layer the FFN goes: predict the needed neurons -> cache lookup/admit (memory management)
-> flash reads of the missing records straight into the cache's free rows (I/O) -> the FFN sum over
cache.matrix[:num_used] restricted to the needed set (compute). Neurons that do not fit stream through
a small scratch buffer, so any cache capacity works and the budget is never exceeded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from flashllm.bundle.format import RecordLayout
from flashllm.disk.reader import FlashReader, RecordRegion
from flashllm.engine.cache import NeuronCache
from flashllm.engine.stats import TokenTimes
from flashllm.models.ffn import COMPUTE_ROWS, FFNSpec, active_mask, ffn_over_rows, neuron_coefficients
from flashllm.models.qrows import Workspace, dequantize_rows, from_records
from flashllm.sparsity.predictors import Predictors

SCRATCH_ROWS = 512  # records streamed past the cache per chunk
# per token of a forward pass: coefficients a (float32), |a| and the masks, predictor logits and the
# int4 estimate (float32), and their bool/float temporaries: 28 bytes per neuron, measured on SmolLM2
_TOKEN_BYTES_PER_NEURON = 28


@dataclass
class FlashCounters:
    """Neurons the FFN needed and how many of them the caches already held."""

    needed: int = 0
    hit: int = 0


class FlashFFN:
    """The FFN provider of a FlashModel: (layer, x [T, d]) -> y [T, d], reading only what is missing.

    mode: "dense" (every neuron), "oracle" (the true |a| > t set, from resident gate/up), "predictor".
    estimate_gate_up: gate/up come from the 4-bit predictors (the split layout's down region is read).
    """

    def __init__(self, spec: FFNSpec, layouts: list[RecordLayout], caches: list[NeuronCache], reader: FlashReader,
                 mode: str, thresholds: list[float], predictors: Predictors | None = None,
                 oracle_weights: list[dict] | None = None, estimate_gate_up: bool = False,
                 work: Workspace | None = None):
        self.spec, self.layouts, self.caches, self.reader = spec, layouts, caches, reader
        self.mode, self.thresholds = mode, list(thresholds)
        self.predictors, self.oracle_weights = predictors, oracle_weights
        self.estimate_gate_up = estimate_gate_up
        record = max(layout.record_bytes for layout in layouts)
        self.scratch = np.zeros((SCRATCH_ROWS, record), dtype=np.uint8)  # [rows, record bytes]
        # quantized records: the needed cache rows are gathered a block at a time into one buffer, and
        # expanded into the shared workspace (both made once: see work_bytes_for)
        self.quantized = any(layout.quantized for layout in layouts)
        self.gathered = np.zeros((COMPUTE_ROWS if self.quantized else 0, record), dtype=np.uint8)
        self._gathered = torch.from_numpy(self.gathered)  # the same memory, for torch's index_select
        self.work = work
        self.times = TokenTimes()
        self.counters = FlashCounters()
        self.trace: list[list[np.ndarray]] | None = None  # [[] per layer] records each token's needed set
        self._estimate: torch.Tensor | None = None  # estimate_gate_up: this layer's a~ [T, n_ff]
        self._prompt = False  # this pass is a prompt's prefill: every neuron (sparsity.reference.PROMPT_DENSE_NOTE)

    @staticmethod
    def work_bytes_for(spec: FFNSpec, record_bytes: int, tokens: int, quantized: bool = False) -> int:
        """Memory the FFN's work takes beyond its caches: the scratch rows and the temporaries of a
        forward pass over `tokens` tokens; quantized records add the buffer of gathered rows and a block's
        products (gate, up, coefficients). Their expansion goes into the model's Workspace, counted there."""
        work = SCRATCH_ROWS * record_bytes + tokens * spec.n_ff * _TOKEN_BYTES_PER_NEURON
        if quantized:
            work += COMPUTE_ROWS * (record_bytes + tokens * 4 * 3)
        return work

    @property
    def nbytes(self) -> int:
        return self.scratch.nbytes + self.gathered.nbytes

    def begin_pass(self, start: int, tokens: int, prompt: bool) -> None:
        """Called by the model before each forward pass; a prompt's prefill keeps every neuron."""
        self._prompt = prompt

    def record_trace(self) -> None:
        """From now on keep every token's needed set per layer in `trace` (policy replay)."""
        self.trace = [[] for _ in self.caches]

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        mask = self._needed_mask(layer, x)  # [T, n_ff] bool
        t1 = time.perf_counter()
        self.times.predictor += t1 - t0
        needed = np.flatnonzero(mask.any(0).numpy())
        if self.trace is not None:
            self.trace[layer].append(needed)
        cache = self.caches[layer]
        hits, missing = cache.lookup(needed)
        insert = cache.admit(missing)
        self.counters.needed += len(needed)
        self.counters.hit += len(hits)
        t2 = time.perf_counter()
        self.times.memory += t2 - t1
        self._read(layer, insert, cache.free_rows(len(insert)))
        cache.commit(insert)
        t3 = time.perf_counter()
        self.times.io += t3 - t2
        if self.layouts[layer].quantized:  # expand only the rows this token needs, a block at a time
            ids = np.concatenate([hits, insert])
            slots = torch.from_numpy(cache.slot_of[ids])
            matrix = torch.from_numpy(cache.matrix)
            y = torch.zeros(x.shape[0], self.spec.d, dtype=x.dtype)
            for start in range(0, len(ids), COMPUTE_ROWS):
                block = slots[start:start + COMPUTE_ROWS]  # index_select: 3x faster than numpy's take here
                torch.index_select(matrix, 0, block, out=self._gathered[:len(block)])
                y += self._compute(layer, x, mask, self.gathered[:len(block)], ids[start:start + COMPUTE_ROWS])
        else:  # float rows: the FFN over the whole cache matrix in place, restricted by the mask
            y = self._compute(layer, x, mask, cache.matrix[:cache.num_used], cache.pointer[:cache.num_used])
        self.times.ffn_compute += time.perf_counter() - t3
        overflow = missing[len(insert):]
        for start in range(0, len(overflow), SCRATCH_ROWS):  # what the cache cannot hold streams past it
            ids = overflow[start:start + SCRATCH_ROWS]
            t4 = time.perf_counter()
            self._read(layer, ids, self.scratch[:len(ids)])
            t5 = time.perf_counter()
            self.times.io += t5 - t4
            y += self._compute(layer, x, mask, self.scratch[:len(ids)], ids)
            self.times.ffn_compute += time.perf_counter() - t5
        return y

    def _needed_mask(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if self.estimate_gate_up:  # the estimate is what the FFN computes with
            self._estimate = self.predictors.layers[layer].coefficients(x)  # [T, n_ff] float32
            if not self._prompt:
                return active_mask(self.spec, self._estimate, self.thresholds[layer])
        if self.mode == "dense" or self._prompt:
            return torch.ones(x.shape[0], self.spec.n_ff, dtype=torch.bool)
        if self.mode == "oracle":
            w = self.oracle_weights[layer]
            a = neuron_coefficients(self.spec, x, w.get("ffn.gate.weight"), w["ffn.up.weight"], w.get("ffn.up.bias"))
            return active_mask(self.spec, a, self.thresholds[layer])
        return self.predictors.predict(layer, x)

    def _read(self, layer: int, ids: np.ndarray, rows: np.ndarray) -> None:
        if len(ids) == 0:
            return
        column = 0
        for region in self.layouts[layer].regions:  # split layout: each region fills its columns of the rows
            self.reader.read(region, ids, rows[:, column:column + region.stride])
            column += region.stride

    def _compute(self, layer: int, x: torch.Tensor, mask: torch.Tensor, rows: np.ndarray,
                 ids: np.ndarray) -> torch.Tensor:
        """The FFN over these cached or streamed rows, restricted to the needed, above-threshold neurons."""
        if len(ids) == 0:
            return torch.zeros(x.shape[0], self.spec.d, dtype=x.dtype)
        layout = self.layouts[layer]
        parts = layout.split(torch.from_numpy(rows[:, :layout.record_bytes]))  # {part: [n, values] or QRows}, views
        index = torch.from_numpy(ids)
        if self.estimate_gate_up:  # a~ from the 4-bit gate/up; the mask already holds |a~| > t_l
            a = (self._estimate[:, index] * mask[:, index]).to(x.dtype)
        else:
            bias = parts["up_bias"][:, 0] if "up_bias" in parts else None
            a = neuron_coefficients(self.spec, x, parts.get("gate"), parts["up"], bias, self.work)  # [T, n]
            keep = mask[:, index] if self._prompt else mask[:, index] & active_mask(self.spec, a, self.thresholds[layer])
            a = a * keep
        return ffn_over_rows(a, parts["down"], x.dtype, self.work)  # [T, d]


class FlashEmbedding:
    """The embedding provider of an untied model: the rows of the tokens at hand, read from the table
    on flash (one record per row), never the whole table."""

    def __init__(self, region: RecordRegion, dtype: torch.dtype | str, compute_dtype: torch.dtype, reader: FlashReader,
                 times: TokenTimes, values: int):
        self.region, self.dtype, self.compute_dtype, self.values = region, dtype, compute_dtype, values
        self.reader, self.times = reader, times

    @staticmethod
    def bytes_for(region: RecordRegion, tokens: int) -> int:
        """The rows of the longest forward pass."""
        return tokens * region.stride

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        ids, inverse = np.unique(tokens.numpy(), return_inverse=True)
        rows = np.empty((len(ids), self.region.stride), dtype=np.uint8)
        self.reader.read(self.region, ids, rows)
        self.times.io += time.perf_counter() - t0
        index = torch.from_numpy(inverse.reshape(-1))
        if isinstance(self.dtype, str):  # quantized rows: "int4" / "int8"
            table = dequantize_rows(from_records(torch.from_numpy(rows), self.dtype, self.values))
            return table[index].to(self.compute_dtype)
        return torch.from_numpy(rows).view(self.dtype)[index].to(self.compute_dtype)
