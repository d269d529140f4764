"""The FFN and embedding providers that read weights from flash.

Per token and layer the FFN goes: predict the needed neurons -> cache lookup/admit (memory management)
-> flash reads of the missing records straight into the cache's free rows (I/O) -> the FFN sum over
cache.matrix[:num_used] restricted to the needed set (compute). Neurons that do not fit stream through
a small scratch buffer, so any cache capacity works and the budget is never exceeded.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from flashllm.bundle.format import RecordLayout
from flashllm.disk.reader import FlashReader, RecordRegion
from flashllm.engine.cache import NeuronCache
from flashllm.engine.stats import TokenTimes
from flashllm.models.ffn import COMPUTE_ROWS, FFNSpec, activate, active_mask, ffn_over_rows, neuron_coefficients
from flashllm.models import packed
from flashllm.native import RecordFFN
from flashllm.native import available as native_available
from flashllm.models.packed import Int8Columns, PackedInt4
from flashllm.models.qrows import Workspace, combine, dequantize_rows, from_records
from flashllm.sparsity.predictors import Predictors

SCRATCH_ROWS = 512  # records streamed past the cache per chunk (at least)
# with the C FFN, about this many bytes of records a chunk: its compute is cheap enough that a chunk's read
# sets the pace, and larger reads keep more requests in flight (0.6 -> 0.8-1.0 GB/s on this disk, measured)
STREAM_BYTES = 4 << 20
# per token of a forward pass: coefficients a (float32), |a| and the masks, predictor logits and the
# int4 estimate (float32), and their bool/float temporaries: 28 bytes per neuron, measured on SmolLM2
_TOKEN_BYTES_PER_NEURON = 28


def kernel_form(layout: RecordLayout) -> bool:
    """Whether a layer's cache can keep its gate/up rows in the int4 kernel's layout: int4 gate and up in
    the records, a down column, and a torch whose kernel layout flashllm.models.packed writes."""
    kinds = {p.name: p.kind for p in layout.parts}
    return kinds.get("gate") == kinds.get("up") == "int4" and "down" in kinds and "up_bias" not in kinds \
        and packed.available()


def native_ffn(layout: RecordLayout, spec: FFNSpec, int8_x: bool = False) -> RecordFFN | None:
    """The C FFN over this layout's records (flashllm.native; gate and up over x quantized to int8 groups
    with `int8_x`), or None where it cannot serve them (no compiler, float or biased records, an activation
    it lacks): the torch path computes those."""
    parts = {p.name: p.kind for p in layout.parts}
    if not spec.gated or not RecordFFN.supports(parts, spec.activation) or not native_available():
        return None
    columns = [layout.column(name) for name in ("gate", "up", "down")]
    return RecordFFN(tuple(c.start for c in columns), tuple(c.kind for c in columns), spec.d, spec.activation,
                     int8_x=int8_x)


def stream_rows(spec: FFNSpec, record_bytes: int, native: RecordFFN | None) -> int:
    """Records streamed per chunk (each of the two scratch buffers holds this many)."""
    if native is None:
        return SCRATCH_ROWS
    return min(spec.n_ff, max(SCRATCH_ROWS, STREAM_BYTES // record_bytes))


def down_columns(layout: RecordLayout) -> bool:
    """Whether a kernel-form layer keeps its down columns in the int8 kernel's form too (int8 down
    records, as convert auto makes them from a quantized GGUF): flashllm.models.packed.Int8Columns."""
    return {p.name: p.kind for p in layout.parts}.get("down") == "int8"


@dataclass
class FlashCounters:
    """Neurons the FFN needed and how many of them the caches already held; `layer_needed`: the needed
    ones per layer (int64 [L]), for the realized sparsity per band of layers (stats.sparsity_bands)."""

    needed: int = 0
    hit: int = 0
    read_ahead: int = 0  # layers whose first streamed chunk the previous layer read, guessed right
    layer_needed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


class FlashFFN:
    """The FFN provider of a FlashModel: (layer, x [T, d]) -> y [T, d], reading only what is missing.

    mode: "dense" (every neuron), "oracle" (the true |a| > t set, from resident gate/up), "predictor".
    estimate_gate_up: gate/up come from the 4-bit predictors (the split layout's down region is read).
    packed: per layer None, or the (gate, up) stores of its cache in the int4 kernel's layout
    (flashllm.models.packed), plus with int8 down records its down columns in the int8 kernel's form
    (gate, up, down): records read go through the scratch rows into the stores (the down column into the
    cache row when there is no down store), the cached neurons' gate/up products are one kernel call
    each, and their down sum one call per group of 32 output values.
    native: per layer None, or the C FFN over its records (flashllm.native): cached records (in a cache
    that is not in kernel form) and streamed ones are computed from their bytes, float32, no expansion.
    """

    def __init__(self, spec: FFNSpec, layouts: list[RecordLayout], caches: list[NeuronCache], reader: FlashReader,
                 mode: str, thresholds: list[float], predictors: Predictors | None = None,
                 oracle_weights: list[dict] | None = None, estimate_gate_up: bool = False,
                 work: Workspace | None = None, packed: list[tuple | None] | None = None,
                 native: list[RecordFFN | None] | None = None):
        self.spec, self.layouts, self.caches, self.reader = spec, layouts, caches, reader
        self.mode, self.thresholds = mode, list(thresholds)
        self.predictors, self.oracle_weights = predictors, oracle_weights
        self.estimate_gate_up = estimate_gate_up
        record = max(layout.record_bytes for layout in layouts)
        # the C FFN, where it serves a layer's records (never with gate/up estimated by the predictors)
        self.native = native if native is not None and not estimate_gate_up else [None] * len(layouts)
        # records streamed past the cache: two buffers, one read (by the prefetch thread) while the other computes
        # (the first also carries records bound for a kernel-form cache)
        self.chunk = stream_rows(spec, record, self.native[0])
        self.scratches = (np.zeros((self.chunk, record), dtype=np.uint8), np.zeros((self.chunk, record), dtype=np.uint8))
        self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashllm-prefetch")
        # quantized records: the needed cache rows are gathered a block at a time into one buffer, and
        # expanded into the shared workspace (both made once: see work_bytes_for)
        self.quantized = any(layout.quantized for layout in layouts)
        self.gathered = np.zeros((COMPUTE_ROWS if self.quantized and self.native[0] is None else 0, record),
                                 dtype=np.uint8)
        self._gathered = torch.from_numpy(self.gathered)  # the same memory, for torch's index_select
        self.work = work
        self.packed = packed or [None] * len(layouts)
        # records streamed past a kernel-form cache without the C FFN take the same kernel path, through two
        # scratch stores (their down columns are expanded from the scratch rows: cheaper than transposing them)
        self.stream_stores = (PackedInt4(SCRATCH_ROWS, spec.d), PackedInt4(SCRATCH_ROWS, spec.d)) \
            if any(p is not None and n is None for p, n in zip(self.packed, self.native)) else None
        self.times = TokenTimes()
        self.counters = FlashCounters(layer_needed=np.zeros(len(layouts), dtype=np.int64))
        self.trace: list[list[np.ndarray]] | None = None  # [[] per layer] records each token's needed set
        self._estimate: torch.Tensor | None = None  # estimate_gate_up: this layer's a~ [T, n_ff]
        self._ahead: tuple | None = None  # (layer, ids, read, scratch buffer): read_ahead's guess
        self._prompt = False  # this pass is a prompt's prefill: every neuron (sparsity.reference.PROMPT_DENSE_NOTE)

    @staticmethod
    def work_bytes_for(spec: FFNSpec, record_bytes: int, tokens: int, quantized: bool = False,
                       kernel: bool = False, columns: bool = False, native: RecordFFN | None = None) -> int:
        """Memory the FFN's work takes beyond its caches: the scratch rows and the temporaries of a
        forward pass over `tokens` tokens; quantized records add the buffer of gathered rows and a block's
        products (gate, up, coefficients). Their expansion goes into the model's Workspace, counted there.
        A kernel-form cache adds the two scratch stores and its products over every cached slot; down
        columns in the int8 kernel's form (`columns`) the temporaries of their sum; the C FFN (`native`)
        the temporaries of its calls, and no scratch stores."""
        work = 2 * stream_rows(spec, record_bytes, native) * record_bytes + tokens * spec.n_ff * _TOKEN_BYTES_PER_NEURON
        if quantized and native is None:
            work += COMPUTE_ROWS * (record_bytes + tokens * 4 * 3)
        if native is not None:  # + the ids of the needed cached records and their slots
            work += native.work_bytes(tokens, spec.n_ff) + spec.n_ff * 16
        if kernel and native is None:
            work += 2 * PackedInt4.bytes_for(SCRATCH_ROWS, spec.d)
        if kernel:
            work += tokens * packed.slots_for(spec.n_ff) * 4 * 3
        if kernel and columns:
            work += Int8Columns.work_bytes(spec.n_ff, spec.d, tokens)
        return work

    @property
    def nbytes(self) -> int:
        stores = sum(store.nbytes for store in self.stream_stores) if self.stream_stores else 0
        return sum(b.nbytes for b in self.scratches) + self.gathered.nbytes + stores

    def close(self) -> None:
        self._prefetch.shutdown(wait=True)

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
        self.counters.layer_needed[layer] += len(needed)
        self.counters.hit += len(hits)
        t2 = time.perf_counter()
        self.times.memory += t2 - t1
        if self.packed[layer] is not None:
            self._admit_packed(layer, insert)
        else:
            self._read(layer, insert, cache.free_rows(len(insert)))
            cache.commit(insert)
            self.times.io += time.perf_counter() - t2
        overflow = missing[len(insert):]  # what the cache cannot hold streams past it, read ahead
        pending, first = self._started(layer, overflow[:self.chunk])
        if pending is None and len(overflow):
            pending = self._prefetch.submit(self._read, layer, overflow[:self.chunk],
                                            self.scratches[first][:min(len(overflow), self.chunk)])
        t3 = time.perf_counter()
        if self.packed[layer] is not None:
            y = self._compute_packed(layer, x, mask, self.packed[layer], cache.pointer[:cache.num_used], cache.matrix, 0)
        elif self.native[layer] is not None:  # the needed cached records where they lie
            ids = np.concatenate([hits, insert])
            y = self._native_sum(layer, cache.matrix, x, mask, ids, index=cache.slot_of[ids])
        elif self.layouts[layer].quantized:  # expand only the rows this token needs, a block at a time
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
        return y + self._stream(layer, x, mask, overflow, pending, first)

    def _started(self, layer: int, ids: np.ndarray) -> tuple:
        """The read of this layer's first streamed chunk if the previous layer started it (read_ahead) and
        guessed these very records, with its scratch buffer; else (None, a free buffer)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None, 0
        guessed_layer, guessed, pending, buffer = ahead
        if guessed_layer == layer and np.array_equal(guessed, ids):
            self.counters.read_ahead += 1
            return pending, buffer
        pending.result()  # a wrong guess: its buffer is free once the read is done
        return None, buffer

    def _read_ahead(self, layer: int, buffer: int) -> None:
        """In dense mode the next layer's needs are known before it runs (every neuron): what its cache
        lacks beyond its free room streams, so its first chunk is read now, while this layer's last chunk
        and the next attention compute. The disk idled there before. Never from the last layer into the
        next pass: generation may end there, and that read would be wasted (and counted or not, by timing)."""
        if self.mode != "dense" or self.native[layer] is None:
            return
        cache = self.caches[layer]
        missing = np.flatnonzero(cache.slot_of < 0)
        ids = missing[cache.capacity - cache.num_used:][:self.chunk]
        if len(ids):
            rows = self.scratches[buffer][:len(ids)]
            self._ahead = (layer, ids, self._prefetch.submit(self._read, layer, ids, rows), buffer)

    def _stream(self, layer: int, x: torch.Tensor, mask: torch.Tensor, overflow: np.ndarray, pending,
                first: int = 0) -> torch.Tensor:
        """The FFN over records that do not fit the cache, self.chunk at a time through two scratch
        buffers (the first chunk's is `first`): the next chunk is read (by the prefetch thread) while this
        one computes, and after the last, the next layer's first. `pending` is the read of the first chunk,
        started before the cached neurons were computed (or by the previous layer)."""
        y = torch.zeros(x.shape[0], self.spec.d, dtype=x.dtype)
        layout, kernel = self.layouts[layer], self.packed[layer] is not None
        for i, start in enumerate(range(0, len(overflow), self.chunk)):
            ids, rows = overflow[start:start + self.chunk], self.scratches[(first + i) % 2]
            t0 = time.perf_counter()
            pending.result()  # the read of this chunk; the wait is the I/O time the token sees
            t1 = time.perf_counter()
            self.times.io += t1 - t0
            following = overflow[start + self.chunk:start + 2 * self.chunk]
            if len(following):
                pending = self._prefetch.submit(self._read, layer, following,
                                                self.scratches[(first + i + 1) % 2][:len(following)])
            elif layer + 1 < len(self.caches):  # not past the pass's last layer: a read nobody may consume
                self._read_ahead(layer + 1, (first + i + 1) % 2)
            if self.native[layer] is not None:
                y += self._native_sum(layer, rows, x, mask, ids, n=len(ids))
            elif kernel:  # gate/up through the scratch stores: the same numbers as cached rows
                self._write_stores(layer, self.stream_stores, 0, rows[:len(ids)])
                y += self._compute_packed(layer, x, mask, self.stream_stores, ids, rows, layout.column("down").start)
            else:
                y += self._compute(layer, x, mask, rows[:len(ids)], ids)
            self.times.ffn_compute += time.perf_counter() - t1
        return y

    def _admit_packed(self, layer: int, ids: np.ndarray) -> None:
        """Read these records through the scratch rows into the next free slots: gate/up (and down) into
        the kernel stores, else the down column into the cache rows (I/O, then memory management)."""
        cache, layout = self.caches[layer], self.layouts[layer]
        down = layout.column("down")
        for start in range(0, len(ids), self.chunk):
            chunk = ids[start:start + self.chunk]
            rows = self.scratches[0][:len(chunk)]
            t0 = time.perf_counter()
            self._read(layer, chunk, rows)
            t1 = time.perf_counter()
            self.times.io += t1 - t0
            self._write_stores(layer, self.packed[layer], cache.num_used, rows)
            if len(self.packed[layer]) == 2:
                cache.free_rows(len(chunk))[:] = rows[:, down.start:down.stop]
            cache.commit(chunk)
            self.times.memory += time.perf_counter() - t1

    def _write_stores(self, layer: int, stores: tuple, slot: int, rows: np.ndarray) -> None:
        """The gate/up rows of these records into (gate, up) stores, from `slot` on (and the down
        columns into a third)."""
        layout = self.layouts[layer]
        parts = layout.split(torch.from_numpy(rows[:, :layout.record_bytes]))
        stores[0].write(slot, parts["gate"])
        stores[1].write(slot, parts["up"])
        if len(stores) > 2:
            stores[2].write(slot, parts["down"])

    def _compute_packed(self, layer: int, x: torch.Tensor, mask: torch.Tensor, stores: tuple,
                        ids: np.ndarray, rows: np.ndarray, down_start: int) -> torch.Tensor:
        """The FFN over neurons `ids` whose gate/up sit in the first len(ids) slots of `stores` and whose
        down columns are in the third store, else start at byte `down_start` of `rows`: gate/up products
        in two kernel calls, then the down columns of the needed, above-threshold neurons (cached and
        streamed rows compute alike)."""
        n = len(ids)
        y = torch.zeros(x.shape[0], self.spec.d)
        if n == 0:
            return y.to(x.dtype)
        gate, up = stores[:2]
        a = activate(gate.matmul(x, n), self.spec.activation) * up.matmul(x, n)  # [T, n]
        keep = mask[:, torch.from_numpy(ids)]
        if not self._prompt:
            keep &= active_mask(self.spec, a, self.thresholds[layer])
        a = a * keep
        if len(stores) > 2:  # every slot's down column in the kernel, the others' coefficients zero
            return stores[2].combine(a, self.work).to(x.dtype)
        chosen = torch.from_numpy(np.flatnonzero(keep.any(0).numpy()))
        down = self.layouts[layer].column("down")
        width = down.stop - down.start
        source = torch.from_numpy(rows)[:, down_start:down_start + width]
        for start in range(0, len(chosen), COMPUTE_ROWS):
            block = chosen[start:start + COMPUTE_ROWS]
            gathered = self._gathered.view(-1)[:len(block) * width].view(len(block), width)
            torch.index_select(source, 0, block, out=gathered)
            y += combine(a[:, block], from_records(gathered, down.kind, down.values), self.work)
        return y.to(x.dtype)

    def _native_sum(self, layer: int, rows: np.ndarray, x: torch.Tensor, mask: torch.Tensor, ids: np.ndarray,
                    **where) -> torch.Tensor:
        """The C FFN over the records of neurons `ids` in `rows` (at `index`, or the first `n`), each with
        its column of the needed mask and the layer's threshold."""
        keep = mask[:, torch.from_numpy(ids)]
        return self.native[layer](rows, x, keep, self._threshold(layer), **where).to(x.dtype)

    def _threshold(self, layer: int) -> float | None:
        """The activation threshold the FFN applies on top of the needed set (none in a prompt's prefill)."""
        return None if self._prompt else self.thresholds[layer]

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
