"""A bundle opened under a DRAM budget: resident attention and head, predictors, per-layer neuron caches,
and a model whose FFN (and untied embedding) providers read from flash. `FlashModel.open` is the one
entry for generate, perplexity, bench and scripts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flashllm.bundle.reader import Bundle
from flashllm.disk.profile import IOProfile
from flashllm.disk.reader import FlashReader
from flashllm.disk.system import bound_heap, current_rss, kernel_read_bytes, peak_rss, release_free_heap, start_runtime
from flashllm.engine.budget import BudgetPlan, plan_budget
from flashllm.engine.cache import POLICIES, NeuronCache
from flashllm import native
from flashllm.engine.flash_ffn import FlashEmbedding, FlashFFN, down_columns, kernel_form, native_ffn
from flashllm.engine.generate import GenerationStats, SamplingSettings, generate
from flashllm.engine.stats import FlashStats, sparsity_bands
from flashllm.errors import FlashLLMError
from flashllm.models import packed
from flashllm.models.layers import KVCache
from flashllm.models.qrows import GROUPED_MIN_ROWS, Int8Groups, Workspace, for_compute
from flashllm.sparsity.predictors import Predictors, load_predictors, predictors_nbytes, read_settings
from flashllm.units import parse_size

MODES = ("predictor", "oracle", "dense")
READ_BYTES = 128 * 1024  # the reader's largest request and per-worker chunk
MAX_THREADS = 16  # per-layer reads are small; more threads only add staging memory
PREFILL_PASS = 64  # prompt tokens per forward pass of the prefill (each pass reads its tokens' union)

@dataclass(frozen=True)
class FlashSettings:
    """How the engine uses flash and DRAM; presets live in configs/ (flashllm.configs)."""

    window: int = 4
    policy: str = "lru"
    pin_fraction: float = 0.5
    threads: int | None = None
    mode: str = "predictor"
    cache: bool = True  # False: no neuron cache, every needed record is read each token
    merge_gap_bytes: int | None = None  # gaps read through when coalescing (None: from the I/O profile)
    flash_embedding: bool = True  # read the input embedding rows from flash (untied models)
    # "int4": gate/up from the 4-bit predictors in DRAM, only down read (split layout); "auto": that where the
    # predictors are the int4 bundle's own gate/up and it fits the budget, else "flash" (read every part)
    gate_up: str = "auto"
    recall: float | None = None  # the predictors' decision cuts for this recall target (None: as trained)
    # int4 gate/up records: the caches keep gate/up in torch's int4 kernel layout (flashllm.models.packed)
    # and compute on them in place; False: cached records are expanded to float32 per token (the old path)
    kernel_cache: bool = True
    # quantized records computed from their bytes by the C FFN (flashllm.native) where it can be built;
    # False: the torch path only
    native: bool = True
    # the C kernels' dot products over x: "float32" (float sums, the reference's numbers) or "int8" (x
    # quantized per group of 32 to int8 and integer sums, as llama.cpp's q8 blocks: gate/up and the LM head
    # ~2x faster, the greedy text may part from the float reference's at near-ties)
    dots: str = "float32"

    def check(self) -> None:
        if self.mode not in MODES:
            raise FlashLLMError(f"unknown mode {self.mode!r} (choose from {', '.join(MODES)})")
        if self.policy not in POLICIES:
            raise FlashLLMError(f"unknown policy {self.policy!r} (choose from {', '.join(POLICIES)})")
        if self.gate_up not in ("auto", "flash", "int4"):
            raise FlashLLMError(f"unknown --gate-up {self.gate_up!r} (auto, flash or int4)")
        if self.dots not in ("int8", "float32"):
            raise FlashLLMError(f"unknown --dots {self.dots!r} (float32 or int8)")
        if self.window < 1:
            raise FlashLLMError(f"window {self.window}: must be at least 1")

    def check_without_budget(self) -> None:
        """Refuse the options only the budgeted engine has (no --dram-budget given)."""
        for option, given in (("--gate-up", self.gate_up == "int4"), ("--dots", self.dots != "float32")):
            if given:
                raise FlashLLMError(f"{option} applies to the budgeted engine: add --dram-budget")


class FlashModel:
    """A bundle loaded under a DRAM budget (bytes, or a size such as "50%" of the bundle or "800MiB").

    `mode` is the mode that runs: "predictor" resolves to "dense" when the bundle has no predictors
    (the caller's settings are left as they were). `thresholds` overrides the predictors' activation
    thresholds (perplexity's calibrated ones)."""

    def __init__(self, folder: Path, budget: int | str, settings: FlashSettings, max_tokens: int,
                 prefill_tokens: int, thresholds: list[float] | None = None, pass_tokens: int | None = None):
        settings.check()
        bound_heap()
        start_runtime()
        self.overhead_bytes = current_rss()  # Python, torch, libraries: before any weight is loaded
        self.bundle = bundle = Bundle(folder)
        self.settings, self.spec = settings, bundle.spec
        L, limit = bundle.config.num_hidden_layers, bundle.config.max_position_embeddings
        if prefill_tokens >= limit:
            raise FlashLLMError(f"the prompt has {prefill_tokens} tokens; the context holds {limit}")
        max_tokens = min(max_tokens, limit)
        # the longest forward pass: a prompt's prefill runs in passes of PREFILL_PASS tokens at most
        pass_tokens = max(1, min(pass_tokens or min(prefill_tokens, PREFILL_PASS), max_tokens))
        budget = parse_size(budget, of=bundle.manifest["sizes"]["total_bytes"], what="budget")
        # the predictors' settings now; their weights only once the plan keeps them (loading them first
        # and dropping them for the budget made a transient peak above it)
        psettings = read_settings(bundle.folder) if settings.mode in ("predictor", "oracle") else None
        self.mode = "dense" if settings.mode == "predictor" and psettings is None else settings.mode
        use_predictors = self.mode == "predictor"
        if use_predictors and settings.recall is not None:
            Predictors.check_recall(psettings, settings.recall)
        # requests of 128 KiB already reach the disk's bandwidth (docs/DESIGN.md §3); smaller staging, more cache
        threads = settings.threads or min(IOProfile.for_path(bundle.folder).best_threads, MAX_THREADS)
        self.reader = FlashReader(threads=threads, max_request_bytes=READ_BYTES, chunk_bytes=READ_BYTES,
                                  merge_gap_bytes=settings.merge_gap_bytes)
        # the input embedding table needs one row per token: it stays on flash unless it is the LM head
        embedding = bundle.embedding_rows() if settings.flash_embedding else None
        c, dtype = bundle.config, bundle.compute_dtype
        skip = ("embed.weight",) if embedding is not None else ()
        weights = {}
        # one at a time into its compute form (a tall int8 matrix, the LM head, a block of rows at a time into
        # the int8 kernel's groups; with the C kernels it stays rows as read, 38 against 62 ms a token for Qwen's)
        grouped = None if settings.native and native.available() else GROUPED_MIN_ROWS
        # int4 matrices in torch's int4 kernel layout, unless the C kernels take int8 dot products (faster)
        int8_x = settings.dots == "int8" and native.available()
        for name, tensor in bundle.resident_tensors(skip, grouped_rows=grouped):
            weights[name] = tensor.to(dtype) if isinstance(tensor, torch.Tensor) else \
                tensor if name == "embed.weight" or int8_x else for_compute(tensor)
            if not isinstance(tensor, torch.Tensor):
                release_free_heap()  # conversion temporaries go back before the next one: a bounded peak
        self.model = bundle.family.model(c, weights, dtype, compute_form=False)  # converted above, one at a time
        self.model.int8_x = int8_x
        # one workspace for every expansion of quantized rows: the FFN's records, QRows matrices, the head
        width = max(self.model.quantized_width, self.spec.d if bundle.quantized else 0)
        # (made once the plan is chosen: where the C kernels compute every record and matrix, none is needed)
        workspace_bytes = Workspace.bytes_for(width) if width else 0
        resident = self.model.nbytes
        if embedding is not None:
            resident += FlashEmbedding.bytes_for(embedding[0], pass_tokens)
        itemsize = torch.empty((), dtype=dtype).element_size()
        common = {
            "resident weights": resident,
            "KV cache": KVCache.bytes_for(L, max_tokens, c.num_key_value_heads, c.head_dim, itemsize),
            "activations": type(self.model).work_bytes_for(c, pass_tokens, max_tokens),
            "reader staging": self.reader.staging_bound,
            "quantized work": sum(Int8Groups.work_bytes(w.n) for w in weights.values() if isinstance(w, Int8Groups)),
        }
        self.notes: list[str] = []  # choices made for this budget, for --verbose
        # the layouts of DRAM this budget may take, best first; the first that fits is kept and each one
        # passed over is said in `notes`. gate/up from the predictors with only down columns read (exact
        # on an int4 bundle whose predictors are its own gate/up), then whole records with the predictors
        # choosing them, then every record (predictors that do not fit are dropped, never a refusal).
        # Before them all: the whole FFN cached without predictors, where that fits in the C FFN's or the
        # kernels' form: computing every neuron there costs less than the predictors (Qwen2.5: 200 ms a token
        # for every neuron in C, 104 ms for the predictors alone).
        choices = []  # (parts, with predictors, only if every neuron is cached)
        if use_predictors and settings.gate_up == "auto" and (settings.kernel_cache or settings.native):
            choices.append((None, False, True))
        if settings.gate_up == "int4" or (settings.gate_up == "auto" and use_predictors and
                                          self._owns_gate_up(bundle, psettings)):
            self._check_int4_gate_up(bundle, psettings)
            choices.append((("down",), True, False))
        if settings.gate_up != "int4":
            choices += [(None, True, False)] if use_predictors else []
            choices.append((None, False, False))
        predictor_bytes = predictors_nbytes(bundle.folder, dtype, psettings) if use_predictors else 0
        for i, (parts, with_predictors, whole_only) in enumerate(choices):
            self.layouts = [bundle.record_layout(layer, parts) for layer in range(L)]
            record = max(layout.record_bytes for layout in self.layouts)
            # the C FFN where it serves every layer's records, cached and streamed (faster than the kernel
            # form below on Qwen2.5's records, 200 against 250-270 ms a token in RAM, and float32 throughout)
            natives = [native_ffn(layout, self.spec, int8_x) if settings.native
                       else None for layout in self.layouts]
            if any(n is None for n in natives):
                natives = [None] * L
            # else a cached neuron: its record, or in kernel form its down column plus the packed gate/up rows
            self.kernel_form = settings.kernel_cache and natives[0] is None and \
                all(kernel_form(layout) for layout in self.layouts)
            # and its down column too in the int8 kernel's form (int8 down records): the cache row keeps nothing
            columns = self.kernel_form and all(down_columns(layout) for layout in self.layouts)
            # the expansion workspace, unless the C FFN computes every record (then native.matmul computes
            # every quantized matrix too); native.matmul's split of x wherever the C kernels are built
            expands = natives[0] is None
            split = native.matmul_work_bytes(width, pass_tokens) if width and native.available() else 0
            quantized_work = (workspace_bytes if expands else 0) + split
            fixed = {**common, "quantized work": common["quantized work"] + quantized_work,
                     "predictors": predictor_bytes if with_predictors else 0,
                     "FFN work": FlashFFN.work_bytes_for(self.spec, record, pass_tokens, bundle.quantized,
                                                         self.kernel_form, columns, natives[0])}
            row = per_neuron = record
            if self.kernel_form:
                row = 0 if columns else \
                    max(layout.column("down").stop - layout.column("down").start for layout in self.layouts)
                store_row = 2 * packed.row_bytes(self.spec.d) + \
                    (packed.Int8Columns.column_bytes(self.spec.d) if columns else 0)
                per_neuron = row + store_row
            stats = psettings.get("window_stats") if with_predictors else None
            need = None
            if stats:
                k = min(settings.window, len(stats["distinct"][0])) - 1
                need = [layer[k] for layer in stats["distinct"]]
            try:
                self.plan: BudgetPlan = plan_budget(budget, fixed, self.spec.n_ff, L, per_neuron, need,
                                                    cache=settings.cache)
                if not whole_only:
                    break
                if (self.kernel_form or natives[0] is not None) and min(self.plan.capacities) >= self.spec.n_ff:
                    self.notes.append("every neuron fits in DRAM" + (" in the kernels' form" if self.kernel_form else
                                                                     "") + ": no predictors, every neuron computed "
                                      "(mode dense)")
                    break
            except FlashLLMError:
                if i == len(choices) - 1:
                    raise
                if whole_only:
                    continue
                self.notes.append(
                    f"gate/up from the predictors ({predictor_bytes / 1e6:,.0f} MB) and only down columns read do "
                    f"not fit the budget: reading whole records" if parts else
                    f"the predictors ({predictor_bytes / 1e6:,.0f} MB) do not fit the budget: reading every "
                    f"neuron (mode dense)")
        self.gate_up = "int4" if parts else "flash"  # what runs
        use_predictors = with_predictors
        if settings.mode == "predictor" and not use_predictors:
            self.mode = "dense"
        self.predictors: Predictors | None = None
        if use_predictors:  # fp16 gemv is fast on CPU
            self.predictors = load_predictors(bundle.folder, dtype=dtype, settings=psettings)
            if settings.recall is not None:
                self.predictors = self.predictors.with_recall(settings.recall)
        self.model.limit_context(max_tokens)
        self.model.limit_pass(pass_tokens)
        self.thresholds = list(thresholds) if thresholds is not None else \
            [float(t) for t in psettings["activation_thresholds"]] if psettings is not None and self.mode != "dense" \
            else [0.0] * L
        if len(self.thresholds) != L:
            raise FlashLLMError(f"{len(self.thresholds)} activation thresholds for a model of {L} layers")
        # what calibration promised per layer: the share of neurons its thresholds dropped on the calibration
        # text (one figure for every layer without "layer_sparsity"); none when dense or the thresholds are
        # the caller's
        self.calibrated: list[float] | None = None
        if psettings is not None and self.mode != "dense" and thresholds is None:
            self.calibrated = [float(v) for v in psettings.get("layer_sparsity") or [psettings["sparsity"]] * L]
        capacities = self.plan.capacities
        if self.kernel_form:  # the stores pad their slots to a multiple of 64 rows: out of each cache's share
            capacities = [packed.capacity_within(cap, per_neuron, store_row) for cap in capacities]
        self.caches = [NeuronCache(self.spec.n_ff, cap, row, settings.policy, settings.window,
                                   settings.pin_fraction) for cap in capacities]
        stores = [None] * L
        if self.kernel_form:
            d = self.spec.d
            stores = [(packed.PackedInt4(cache.capacity, d), packed.PackedInt4(cache.capacity, d))
                      + ((packed.Int8Columns(cache.capacity, d),) if columns else ()) for cache in self.caches]
            for cache, pair in zip(self.caches, stores):
                cache.companions = list(pair)
        self.workspace = Workspace(width) if width and expands else None
        self.ffn = FlashFFN(self.spec, self.layouts, self.caches, self.reader, self.mode, self.thresholds,
                            self.predictors, self._load_oracle() if self.mode == "oracle" else None,
                            estimate_gate_up=self.gate_up == "int4", work=self.workspace, packed=stores,
                            native=natives)
        self.native = natives[0] is not None
        if settings.native and not self.native and bundle.quantized and self.gate_up != "int4":
            self.notes.append(f"the C FFN does not serve these records ({native.why_not() or 'their parts or activation'}): "
                              "computing them with torch")
        self.model.use_ffn(self.ffn)
        if self.workspace is not None:
            self.model.use_workspace(self.workspace)
        self.embedding = None
        if embedding is not None:
            self.embedding = FlashEmbedding(*embedding, dtype, self.reader, self.ffn.times, c.hidden_size)
            self.model.use_embedding(self.embedding)
        release_free_heap()  # loading left freed buffers in the C heap; the budget counts only what we keep

    @classmethod
    def open(cls, folder: Path, budget: int | str = "50%", settings: FlashSettings | None = None,
             max_tokens: int = 512, prefill_tokens: int = 64, thresholds: list[float] | None = None,
             pass_tokens: int | None = None) -> "FlashModel":
        """The bundle at `folder` under `budget`, for contexts of up to `max_tokens` tokens whose longest
        prompt has `prefill_tokens` tokens. Prompts are prefilled in passes of at most `pass_tokens` tokens
        (default: PREFILL_PASS), which bounds the temporaries; a caller that forwards whole windows at once
        (perplexity) passes their length."""
        return cls(folder, budget, settings or FlashSettings(), max_tokens, prefill_tokens, thresholds, pass_tokens)

    def _owns_gate_up(self, bundle: Bundle, psettings: dict) -> bool:
        """The predictors are this int4 bundle's own gate/up rows (not a requantized copy) and the layout
        keeps down columns apart: gate/up from DRAM is then the model itself, and reads shrink to down."""
        return self.spec.gated and psettings.get("kind") == "int4" and \
            psettings.get("int4_source") == "bundle" and bundle.layout == "split"

    def _check_int4_gate_up(self, bundle: Bundle, psettings: dict | None) -> None:
        """gate/up from the predictors' 4-bit copy: a gated model, int4 predictors, a split layout."""
        if not self.spec.gated:
            raise FlashLLMError("--gate-up int4 applies to gated FFNs; a ReLU FFN's up rows are read with its down columns")
        if self.settings.mode != "predictor" or psettings is None or psettings.get("kind", "lowrank") != "int4":
            raise FlashLLMError(f"--gate-up int4 needs int4 predictors in predictor mode; run "
                                f"`flashllm train-predictor {bundle.folder}` (int4 is the default for gated FFNs)")
        if bundle.layout != "split":
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

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], settings: SamplingSettings, eos_ids=(), stats: FlashStats | None = None):
        """Yield token ids like engine.generate; fills FlashStats (decode steps only in per-token figures)."""
        stats = stats if stats is not None else FlashStats()
        gen = GenerationStats()
        kernel0, marks = kernel_read_bytes(), None
        for i, token in enumerate(generate(self.model, prompt_ids, settings, eos_ids, gen,
                                           max_context=len(prompt_ids) + settings.max_tokens)):
            if i == 0:  # the prefill is done: per-token figures start here
                marks = self.marks()
                kernel0 = kernel_read_bytes()
                stats.prefill_seconds = gen.prefill_seconds
            yield token
        self._finish(stats, gen, marks, kernel0)

    def marks(self) -> dict:
        """The running counters (seconds per phase, bytes, requests, neurons), for deltas."""
        t, totals = self.ffn.times, self.reader.totals
        return {"io": t.io, "memory": t.memory, "predictor": t.predictor, "ffn": t.ffn_compute,
                "read": totals.bytes_read, "useful": totals.bytes_useful, "requests": totals.requests,
                "needed": self.ffn.counters.needed, "hit": self.ffn.counters.hit,
                "layer_needed": self.ffn.counters.layer_needed.copy()}

    def _finish(self, stats: FlashStats, gen: GenerationStats, marks: dict | None, kernel0: int | None) -> None:
        now = self.marks()
        steps = len(gen.step_seconds)
        # no decode step: a zero of each counter's kind (the per-layer counts an array of zeros)
        delta = {k: now[k] - marks[k] for k in now} if marks else {k: now[k] * 0 for k in now}
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
        stats.sparsity_bands = sparsity_bands(delta["layer_needed"].tolist(), steps, n_ff, self.calibrated)
        stats.window, stats.policy, stats.mode = self.settings.window, self.settings.policy, self.mode
        stats.gate_up, stats.kernel_cache, stats.native = self.gate_up, self.kernel_form, self.native
        int8 = self.model.int8_x and (self.native or self.model.quantized_width)
        stats.dots = "int8" if int8 else "float32"  # what ran: float bundles have no quantized dot products
        stats.cache_share = self.plan.cache_share
        stats.step_ms = [1000 * s for s in gen.step_seconds]

    def close(self) -> None:
        self.ffn.close()
        self.reader.close()
