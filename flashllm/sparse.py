"""The budgeted engine: resident attention, FFN neurons streamed from flash through per-layer caches.

Per token and layer: predictor -> cache lookup/admit (memory management) -> flash reads of the missing
records straight into the cache's free rows (I/O) -> the FFN on cache.matrix[:num_used] restricted to
the predicted set (compute). Neurons that do not fit are streamed through a small scratch buffer, so
any budget at or above the resident minimum works and is never exceeded.
"""

from __future__ import annotations

import re
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from flashllm.cache import NeuronCache
from flashllm.errors import FlashLLMError
from flashllm.flash import FlashReader, IOProfile, kernel_read_bytes
from flashllm.layout import Bundle
from flashllm.models.common import KVCache, active_mask, neuron_coefficients

MODES = ("predictor", "oracle", "dense")
SCRATCH_ROWS = 512  # records streamed past the cache per chunk
READ_BYTES = 128 * 1024  # the reader's largest request and per-worker chunk
MAX_THREADS = 16  # per-layer reads are small; more threads only add staging memory
COMPUTE_ROWS = 1024  # cached rows per block of the FFN sum: temporaries stay small (Qwen: 3-6 MB)
ALLOCATOR_SLACK = 8 * 2**20  # freed temporaries the C heap keeps (measured 4-10 MB on SmolLM2)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30}


@dataclass
class FlashSettings:
    """How the engine uses flash and DRAM; presets live in configs/."""

    window: int = 4
    policy: str = "lru"
    pin_fraction: float = 0.5
    threads: int | None = None
    mode: str = "predictor"
    cache: bool = True  # False: no neuron cache, every needed record is read each token
    merge_gap_bytes: int | None = None  # gaps read through when coalescing (None: from the I/O profile)
    flash_embedding: bool = True  # read the input embedding rows from flash (untied models)
    gate_up: str = "flash"  # "int4": gate/up from the 4-bit predictors in DRAM, only down read (split layout)


def parse_budget(text: str, model_bytes: int) -> int:
    """'1.5GB', '800MiB', '50%' (of the model), or plain bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z%]*)\s*", str(text))
    if not m:
        raise FlashLLMError(f"malformed budget {text!r} (examples: 1.5GB, 800MiB, 50%)")
    value, unit = float(m.group(1)), m.group(2).upper()
    if unit == "%":
        return int(model_bytes * value / 100)
    if unit not in _UNITS:
        raise FlashLLMError(f"malformed budget {text!r}: unknown unit {m.group(2)!r} (B, KB, MB, GB, KiB, MiB, GiB, %)")
    return int(value * _UNITS[unit])


@dataclass
class BudgetPlan:
    budget_bytes: int
    resident_bytes: int
    predictor_bytes: int
    kv_bytes: int
    work_bytes: int
    index_bytes: int  # per-neuron cache bookkeeping (slot map, frequencies), whatever the capacity
    capacities: list[int]
    cache_bytes: int
    record_bytes: int
    n_ff: int

    @property
    def fixed_bytes(self) -> int:
        return self.resident_bytes + self.predictor_bytes + self.kv_bytes + self.work_bytes + self.index_bytes

    @property
    def planned_bytes(self) -> int:
        return self.fixed_bytes + self.cache_bytes

    @property
    def cache_share(self) -> float:
        """Cache capacity as a share of the whole FFN."""
        return sum(self.capacities) / (self.n_ff * len(self.capacities))

    def lines(self) -> list[str]:
        mb = lambda n: f"{n / 1e6:,.1f} MB"  # noqa: E731
        caps = self.capacities
        return [f"budget {mb(self.budget_bytes)}: planned {mb(self.planned_bytes)}",
                f"  resident weights {mb(self.resident_bytes)}, predictors {mb(self.predictor_bytes)}, "
                f"KV cache {mb(self.kv_bytes)}, work buffers {mb(self.work_bytes)}, cache index {mb(self.index_bytes)}",
                f"  neuron caches {mb(self.cache_bytes)}: {min(caps)}-{max(caps)} of {self.n_ff} neurons per layer "
                f"({100 * self.cache_share:.1f}% of the FFN)"]


def plan_budget(bundle: Bundle, budget: int, predictor_bytes: int, max_tokens: int, prefill_tokens: int,
                weights: list[float] | None = None, reader_bytes: int = 0, cache: bool = True,
                flash_embedding: bool = False, parts: tuple[str, ...] | None = None) -> BudgetPlan:
    """Fixed costs first; what is left becomes neuron caches, split by each layer's need (`weights`:
    the paper's Req_i, e.g. distinct neurons over the window) and never more than a layer's neurons.
    flash_embedding: the input embedding table stays on flash (only the prompt's rows are held)."""
    c, spec = bundle.config, bundle.spec
    L, n_ff, record = c.num_hidden_layers, spec.n_ff, _record_bytes(bundle, parts)
    resident = bundle.resident_bytes
    embedding = bundle.embedding_rows() if flash_embedding else None
    if embedding is not None:
        region, _ = embedding
        resident -= region.count * region.stride
        resident += prefill_tokens * region.stride  # the rows of the longest forward pass
    kv = KVCache.bytes_for(L, max_tokens, c.num_key_value_heads, c.head_dim, bundle.itemsize)
    # scratch for streamed records + reader staging + activations of the longest forward pass
    rotary = 2 * max_tokens * c.head_dim * 4
    # per token of the longest pass: coefficients, masks and predictor outputs (n_ff * 28), activations
    work = SCRATCH_ROWS * record + reader_bytes + prefill_tokens * (n_ff * 28 + c.hidden_size * 32) + \
        c.vocab_size * 8 + rotary + ALLOCATOR_SLACK
    index = L * n_ff * 16
    fixed = resident + predictor_bytes + kv + work + index
    if budget < fixed:
        raise FlashLLMError(f"DRAM budget {budget / 1e6:,.0f} MB is below the minimum {fixed / 1e6:,.0f} MB "
                            f"(resident weights {resident / 1e6:,.0f} MB, predictors {predictor_bytes / 1e6:,.0f} MB, "
                            f"KV cache {kv / 1e6:,.0f} MB, work buffers {work / 1e6:,.0f} MB, cache index {index / 1e6:,.0f} MB)")
    per_row = record + 16  # the record and its slot bookkeeping
    spare = budget - fixed
    weights = np.asarray(weights if weights is not None else [1.0] * L, dtype=np.float64)
    weights = np.maximum(weights, 1e-9)
    capacities = np.zeros(L, dtype=np.int64)
    open_layers = np.ones(L, dtype=bool)
    rows_left = max(spare, 0) // per_row if cache else 0
    while rows_left > 0 and open_layers.any():  # water-filling: a full layer's share goes to the others
        share = weights * open_layers / (weights * open_layers).sum()
        grant = np.minimum(np.floor(share * rows_left).astype(np.int64), n_ff - capacities)
        if grant.sum() == 0:
            break
        capacities += grant
        rows_left -= int(grant.sum())
        open_layers &= capacities < n_ff
    cache_bytes = int(capacities.sum()) * per_row
    return BudgetPlan(budget, resident, predictor_bytes, kv, work, index, capacities.tolist(), cache_bytes, record,
                      n_ff)


def _release_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def staging_bound(reader: FlashReader) -> int:
    """The most memory the reader's staging buffers can hold: one per worker and one for the calling
    thread, each a power of two covering a chunk plus one request."""
    per_thread = 1 << (reader.chunk_bytes + reader.max_request_bytes - 1).bit_length()
    return (reader.threads + 1) * per_thread


def _record_bytes(bundle: Bundle, parts: tuple[str, ...] | None = None) -> int:
    """Bytes per neuron the engine reads and caches: whole records, or only the regions holding `parts`."""
    return sum(r["stride"] for r in _regions_with(bundle.layers[0]["regions"], parts))


def _regions_with(regions: list, parts: tuple[str, ...] | None) -> list:
    """The regions (manifest dicts or (RecordRegion, parts) pairs) that hold any of `parts` (None: all)."""
    if parts is None:
        return list(regions)
    names = lambda r: {p["name"] for p in (r["parts"] if isinstance(r, dict) else r[1])}  # noqa: E731
    return [r for r in regions if names(r) & set(parts)]


@dataclass
class TokenTimes:
    io: float = 0.0
    memory: float = 0.0
    predictor: float = 0.0
    ffn_compute: float = 0.0


@dataclass
class FlashStats:
    """Everything `--stats json` reports; counters cover decode steps unless named otherwise."""

    budget_bytes: int = 0
    planned_bytes: int = 0
    overhead_bytes: int = 0
    peak_rss_bytes: int = 0
    tokens: int = 0
    bytes_read: int = 0
    bytes_useful: int = 0
    requests: int = 0
    kernel_bytes_read: int | None = 0
    neurons_needed: int = 0
    neurons_hit: int = 0
    ms_per_token: dict = field(default_factory=dict)
    tokens_per_s: float = 0.0
    cache_hit_rate: float = 0.0
    sparsity: float = 0.0
    window: int = 0
    policy: str = ""
    mode: str = ""
    cache_share: float = 0.0
    prefill_seconds: float = 0.0
    step_ms: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("step_ms")
        d["bytes_read_per_token"] = self.bytes_read / self.tokens if self.tokens else 0
        return d


def peak_rss() -> int:
    """The process's peak RSS (VmHWM). Not getrusage's ru_maxrss, which keeps the peak of the image a
    forked child had before exec (a large parent shows up as our peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class FlashModel:
    """A bundle loaded under a DRAM budget: resident weights, predictors, per-layer neuron caches."""

    def __init__(self, folder: Path, budget: int, settings: FlashSettings, max_tokens: int, prefill_tokens: int):
        if settings.mode not in MODES:
            raise FlashLLMError(f"unknown mode {settings.mode!r} (choose from {', '.join(MODES)})")
        self.overhead_bytes = current_rss()  # Python, torch, libraries: before any weight is loaded
        self.bundle = bundle = Bundle(folder)
        self.settings = settings
        self.spec = bundle.spec
        self.predictors = None
        if settings.mode in ("predictor", "oracle"):  # the oracle uses the predictors' activation thresholds
            from flashllm.predictor import load_predictors

            self.predictors = load_predictors(bundle.folder, dtype=bundle.dtype)  # fp16 gemv is fast on CPU
        if settings.mode == "predictor" and self.predictors is None:
            self.settings.mode = "dense"  # the CLI says once how to train them
        self.parts = None  # the record parts read from flash (None: all)
        if settings.gate_up not in ("flash", "int4"):
            raise FlashLLMError(f"unknown --gate-up {settings.gate_up!r} (flash or int4)")
        if settings.gate_up == "int4":
            self._check_int4_gate_up(bundle)
            self.parts = ("down",)
        L = bundle.config.num_hidden_layers
        need = None
        if self.predictors is not None and self.predictors.window_stats:
            stats = self.predictors.window_stats
            k = min(settings.window, len(stats["distinct"][0])) - 1
            need = [layer[k] for layer in stats["distinct"]]
        predictor_bytes = self.predictors.nbytes if settings.mode == "predictor" else 0
        # requests of 128 KiB already reach the disk's bandwidth (DESIGN.md §3); smaller staging, more cache
        threads = settings.threads or min(IOProfile.for_path(bundle.folder).best_threads, MAX_THREADS)
        self.reader = FlashReader(threads=threads, max_request_bytes=READ_BYTES, chunk_bytes=READ_BYTES,
                                  merge_gap_bytes=settings.merge_gap_bytes)
        # the input embedding table needs one row per token: it stays on flash unless it is the LM head
        self.embedding = bundle.embedding_rows() if settings.flash_embedding else None
        self.plan = plan_budget(bundle, budget, predictor_bytes, max_tokens, prefill_tokens, need,
                                staging_bound(self.reader), cache=settings.cache,
                                flash_embedding=self.embedding is not None, parts=self.parts)
        skip = ("embed.weight",) if self.embedding is not None else ()
        weights = {name: tensor for name, tensor in bundle.resident_tensors(skip)}
        self.model = bundle.family.model(bundle.config, weights, bundle.dtype)
        self.model.limit_context(max_tokens)
        if self.embedding is not None:
            self.model.embed = self._embed
        self.thresholds = self.predictors.activation_thresholds if self.predictors is not None else [0.0] * L
        self.oracle_weights = self._load_oracle() if settings.mode == "oracle" else None
        record = self.plan.record_bytes
        self.caches = [NeuronCache(self.spec.n_ff, cap, record, settings.policy, settings.window,
                                   settings.pin_fraction) for cap in self.plan.capacities]
        self.scratch = np.zeros((SCRATCH_ROWS, record), dtype=np.uint8)  # [rows, record bytes]
        self.regions = [_regions_with(bundle.regions(layer), self.parts) for layer in range(L)]
        self.estimate: torch.Tensor | None = None  # gate_up int4: this layer's a~ [T, n_ff]
        self.times = TokenTimes()
        self.needed = self.hit = 0
        self.trace: list[list[np.ndarray]] | None = None  # set to [[] per layer] to record needed sets
        _release_free_heap()  # loading left freed buffers in the C heap; the budget counts only what we keep

    def _embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """The rows of these tokens, read from the embedding table on flash."""
        t0 = time.perf_counter()
        region, dtype = self.embedding
        ids, inverse = np.unique(tokens.numpy(), return_inverse=True)
        rows = np.empty((len(ids), region.stride), dtype=np.uint8)
        self.reader.read(region, ids, rows)
        self.times.io += time.perf_counter() - t0
        return torch.from_numpy(rows).view(dtype)[torch.from_numpy(inverse.reshape(-1))].to(self.bundle.dtype)

    def _check_int4_gate_up(self, bundle: Bundle) -> None:
        """gate/up from the predictors' 4-bit copy: a gated model, int4 predictors, a split layout."""
        if not self.spec.gated:
            raise FlashLLMError("--gate-up int4 applies to gated FFNs; a ReLU FFN's up rows are read with its down columns")
        if self.settings.mode != "predictor" or self.predictors is None or self.predictors.kind != "int4":
            raise FlashLLMError(f"--gate-up int4 needs int4 predictors in predictor mode; run "
                                f"`flashllm train-predictor {bundle.folder}` (int4 is the default for gated FFNs)")
        if bundle.manifest["layout"] != "split":
            raise FlashLLMError(f"--gate-up int4 reads only down columns, which needs the split layout: "
                                f"`flashllm convert {bundle.folder} OUT --layout split`, then train-predictor OUT "
                                f"(or copy the predictors)")

    def _load_oracle(self) -> list[dict]:
        """Oracle mode knows each token's true active set: it keeps gate/up (and bias) of every layer
        resident. An upper bound for the predictor, outside the budget by construction."""
        oracle = []
        for layer in range(self.bundle.config.num_hidden_layers):
            dense = self.bundle.dense_ffn(layer)
            oracle.append({k.split(".", 2)[2]: v for k, v in dense.items() if "down" not in k})
        return oracle

    # -- the FFN callable handed to model.forward ----------------------------------------------
    def ffn(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: [T, d] -> y: [T, d], reading only missing records of the needed neurons."""
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
        self.needed += len(needed)
        self.hit += len(hits)
        t2 = time.perf_counter()
        self.times.memory += t2 - t1
        self._read(layer, insert, cache.free_rows(len(insert)))
        cache.commit(insert)
        t3 = time.perf_counter()
        self.times.io += t3 - t2
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
        n_ff = self.spec.n_ff
        if self.settings.mode == "dense":
            return torch.ones(x.shape[0], n_ff, dtype=torch.bool)
        if self.settings.mode == "oracle":
            w = self.oracle_weights[layer]
            a = neuron_coefficients(self.spec, x, w.get("ffn.gate.weight"), w["ffn.up.weight"], w.get("ffn.up.bias"))
            return active_mask(self.spec, a, self.thresholds[layer])
        if self.parts is not None:  # gate_up int4: the estimate is what the FFN computes with
            self.estimate = self.predictors.layers[layer].coefficients(x)  # [T, n_ff] float32
            return active_mask(self.spec, self.estimate, self.thresholds[layer])
        return self.predictors.predict(layer, x)

    def _read(self, layer: int, ids: np.ndarray, rows: np.ndarray) -> None:
        if len(ids) == 0:
            return
        column = 0
        for region, _ in self.regions[layer]:  # split layout: each region fills its columns of the rows
            self.reader.read(region, ids, rows[:, column:column + region.stride])
            column += region.stride

    def _compute(self, layer: int, x: torch.Tensor, mask: torch.Tensor, rows: np.ndarray,
                 ids: np.ndarray) -> torch.Tensor:
        """The FFN over these cached or streamed rows, restricted to the needed, above-threshold neurons."""
        if len(ids) == 0:
            return torch.zeros(x.shape[0], self.spec.d, dtype=x.dtype)
        records = torch.from_numpy(rows)  # [n, record bytes] uint8, no copy
        parts, column = {}, 0
        for region, region_parts in self.regions[layer]:
            parts |= self.bundle.split_records(records[:, column:column + region.stride], region_parts)
            column += region.stride
        index = torch.from_numpy(ids)
        if self.parts is not None:  # a~ from the 4-bit gate/up; the mask already holds |a~| > t_l
            a = (self.estimate[:, index] * mask[:, index]).to(x.dtype)
        else:
            bias = parts["up_bias"][:, 0] if "up_bias" in parts else None
            a = neuron_coefficients(self.spec, x, parts.get("gate"), parts["up"], bias)  # [T, n]
            keep = mask[:, index] & active_mask(self.spec, a, self.thresholds[layer])
            a = a * keep
        down = parts["down"]  # [n, d]
        # a block of rows at a time, so no temporary grows with the cache (Qwen: <= 6 MB)
        if x.shape[0] == 1:  # one token: a weighted sum of rows is the fast path for half precision
            y = torch.zeros(1, down.shape[1], dtype=torch.float32)  # (and 3x faster in blocks than at once)
            for start in range(0, down.shape[0], COMPUTE_ROWS):
                stop = start + COMPUTE_ROWS
                y += (a[:, start:stop].T * down[start:stop]).sum(0, keepdim=True, dtype=torch.float32)
            return y.to(x.dtype)
        y = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float32)  # [T, d]
        for start in range(0, down.shape[0], COMPUTE_ROWS):
            stop = start + COMPUTE_ROWS
            y += a[:, start:stop].float() @ down[start:stop].float()
        return y.to(x.dtype)

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], settings, eos_ids=(), stats: FlashStats | None = None):
        """Yield token ids like engine.generate; fills FlashStats (decode steps only in per-token figures)."""
        from flashllm.engine import GenerationStats, generate

        stats = stats if stats is not None else FlashStats()
        gen = GenerationStats()
        kernel0, marks = kernel_read_bytes(), None
        for i, token in enumerate(generate(self.model, prompt_ids, settings, eos_ids, gen, self.ffn,
                                           max_context=len(prompt_ids) + settings.max_tokens)):
            if i == 0:  # the prefill is done: per-token figures start here
                marks = self._marks()
                kernel0 = kernel_read_bytes()
                stats.prefill_seconds = gen.prefill_seconds
            yield token
        self._finish(stats, gen, marks, kernel0)

    def _marks(self) -> dict:
        t = self.times
        return {"io": t.io, "memory": t.memory, "predictor": t.predictor, "ffn": t.ffn_compute,
                "read": self.reader.totals.bytes_read, "useful": self.reader.totals.bytes_useful,
                "requests": self.reader.totals.requests, "needed": self.needed, "hit": self.hit}

    def _finish(self, stats: FlashStats, gen, marks: dict, kernel0: int | None) -> None:
        now = self._marks()
        steps = len(gen.step_seconds)
        delta = {k: now[k] - marks[k] for k in now} if marks else {k: 0 for k in now}
        total = gen.decode_seconds
        kernel1 = kernel_read_bytes()
        per = (lambda seconds: 1000 * seconds / steps) if steps else (lambda seconds: 0.0)
        stats.budget_bytes, stats.planned_bytes = self.plan.budget_bytes, self.plan.planned_bytes
        stats.overhead_bytes, stats.peak_rss_bytes = self.overhead_bytes, peak_rss()
        stats.tokens = steps
        stats.bytes_read, stats.bytes_useful, stats.requests = delta["read"], delta["useful"], delta["requests"]
        stats.kernel_bytes_read = kernel1 - kernel0 if kernel0 is not None and kernel1 is not None else None
        stats.neurons_needed, stats.neurons_hit = delta["needed"], delta["hit"]
        stats.cache_hit_rate = delta["hit"] / delta["needed"] if delta["needed"] else 0.0
        stats.ms_per_token = {"io": per(delta["io"]), "memory": per(delta["memory"]),
                              "predictor": per(delta["predictor"]),
                              "compute": per(total - delta["io"] - delta["memory"] - delta["predictor"]),
                              "ffn_compute": per(delta["ffn"]), "total": per(total)}
        stats.tokens_per_s = steps / total if total else 0.0
        n_ff, L = self.spec.n_ff, self.bundle.config.num_hidden_layers
        stats.sparsity = 1 - delta["needed"] / (steps * n_ff * L) if steps else 0.0
        stats.window, stats.policy, stats.mode = self.settings.window, self.settings.policy, self.settings.mode
        stats.cache_share = self.plan.cache_share
        stats.step_ms = [1000 * s for s in gen.step_seconds]

    def close(self) -> None:
        self.reader.close()
