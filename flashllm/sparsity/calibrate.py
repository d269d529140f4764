"""Sparsity chosen by quality: per-layer thresholds from a quality target, measured per domain.

`train-predictor` runs two passes over the layers, each holding one layer's FFN (as stored: quantized
rows stay quantized) and predictor at a time, with the hidden states of every sequence advancing
through layer l before layer l + 1 is read:

1. Calibration, on the training text (dense): per layer, the |a| quantile of each sparsity level
   (0, 0.05 .. 0.95), what dropping the neurons below each costs (the relative error it puts into the
   residual stream, ||FFN output of the dropped neurons||^2 / ||h||^2 over a sample of tokens), and the
   predictor's decision cut for each level and recall target (on the validation slice).
2. Evaluation (sparsity/scoring.py), on the held-out text of each domain: the dense model and every candidate allocation
   run side by side, layer by layer, in predictor mode (what `generate` runs), scored as
   `flashllm perplexity` scores (sparsity/quality.py): perplexity, top-1 agreement with dense, KL.

Candidates are mean sparsities (LADDER) spread over the layers uniformly (the default) or greedily:
starting from dense, repeatedly raise the level of the layer whose next step costs the least error per
unit of sparsity (in the spirit of TEAL's greedy allocation, which spreads one block's sparsity over its
matrices by the block's output error; here the layers share the model's by each FFN's own output
error). Measured on SmolLM2-135M, the greedy allocations cost more perplexity than uniform at the same
mean sparsity on every domain (README), so uniform is the default and greedy (or best: both scored) is
asked for. The chosen allocation is the sparsest candidate whose perplexity is within
--max-quality-loss percent of dense and whose top-1 agreement is at least --min-agreement on every
held-out domain; none: dense.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from flashllm.corpus import BUILTIN, DOMAINS, builtin_corpus
from flashllm.disk.system import bound_heap, current_rss, peak_rss, start_runtime
from flashllm.errors import FlashLLMError
from flashllm.models.ffn import FFNSpec, active_mask, ffn_over_rows, neuron_coefficients
from flashllm.models.qrows import GROUP, QRows, Workspace, dequantize_rows, for_compute
from flashllm.sparsity.lowrank import ALL_LOGIT, ALWAYS_ACTIVE, RECALL_GRID, cut_rank, mean_window, train_layer
from flashllm.sparsity.predictors import Int4Predictor
from flashllm.sparsity.quality import chunks_of
from flashllm.sparsity.thresholds import THRESHOLD_GRID, abs_sample, sparsity_threshold
from flashllm.units import parse_size

LADDER = (0.2, 0.3, 0.4, 0.5)  # mean sparsities tried for a quality target, each a pass of the held-out text
ERROR_TOKENS = 256  # training tokens per layer on which each level's output error is measured
CUT_SAMPLE = 1 << 18  # validation coefficients per layer the decision cuts are tuned on
SAMPLE = 1 << 20  # |a| values per layer the level quantiles are taken from
VAL_TOKENS = 256  # validation tokens the decision cuts and counts are taken on, per layer
WINDOW_TOKENS = 256  # validation tokens the window statistics are counted on, per level
SCORE_ROWS = 16  # positions whose logits are computed at once at the end (vocab x 16 floats, a few times)
MIN_EVAL_TOKENS = 16
HEAD_NAMES = ("embed.weight", "lm_head.weight")
PLAN_MARGIN = 1.25
OUTLIER_FACTOR = 10.0  # an output dimension this many times the median's mean |y| is left out of the error


def levels_for(sparsity: float | None, gated: bool) -> list[float]:
    """The sparsity levels every layer is calibrated at: 0, the grid, and an asked one off the grid."""
    if not gated:
        return [0.0]
    return sorted({0.0, *THRESHOLD_GRID, *([round(sparsity, 6)] if sparsity else [])})


@dataclass
class LayerStats:
    """One layer's calibration: per level its threshold, output error, decision cuts and counts."""

    levels: list[float]
    thresholds: list[float]
    errors: list[float]
    cuts: list[dict[str, float]]  # per level: recall key -> logit cut
    counts: list[dict[str, float]]  # per level, for the main recall: true / predicted / hit shares (validation)
    distinct: list[list[float]]  # per level: distinct neurons over windows of K tokens (validation)
    predicted_distinct: list[list[float]]
    pinned: list[int]
    seconds: float
    stored_bytes: int

    def row(self, layer: int, j: int, rank: int) -> dict:
        c = self.counts[j]
        return {"layer": layer, "rank": rank, "sparsity": self.levels[j], "true_active": c["true"],
                "predicted_active": c["predicted"], "recall": c["hits"] / c["true"] if c["true"] else 1.0,
                "precision": c["hits"] / c["predicted"] if c["predicted"] else 1.0,
                "decision_threshold": self.cuts[j][c["key"]], "error": self.errors[j],
                "stored_bytes": self.stored_bytes, "pinned": len(self.pinned), "train_seconds": self.seconds}


@dataclass
class CalibrationStats:
    layers: list[LayerStats] = field(default_factory=list)
    own_layers: int = 0  # int4 layers whose predictor is the bundle's own gate/up
    int4_rows: int = 0
    int4_group: int = 0
    collect_seconds: float = 0.0
    lowrank: list = field(default_factory=list)  # trained low-rank predictors (small), for the evaluation pass


@dataclass
class Candidate:
    name: str
    allocation: str  # "greedy", "uniform" or "dense"
    target: float  # the mean sparsity asked
    levels: list[int]  # per layer, the index of its level

    def mean_level(self, stats: CalibrationStats) -> float:
        return sum(s.levels[j] for s, j in zip(stats.layers, self.levels)) / len(self.levels)


def allocate_greedy(errors: list[list[float]], levels: list[float], target: float) -> list[int]:
    """Per-layer level indices whose mean level reaches `target`: from dense, one step at a time in the
    layer whose next step adds the least error per unit of sparsity (ties: the lower layer)."""
    idx = [0] * len(errors)
    need = target * len(errors) - 1e-9
    while sum(levels[j] for j in idx) < need:
        best, best_cost = None, math.inf
        for layer, j in enumerate(idx):
            if j + 1 < len(levels):
                cost = (errors[layer][j + 1] - errors[layer][j]) / (levels[j + 1] - levels[j])
                if cost < best_cost:
                    best, best_cost = layer, cost
        if best is None:
            break
        idx[best] += 1
    return idx


def candidates(stats: CalibrationStats, opts, L: int) -> list[Candidate]:
    """The allocations the evaluation pass measures (the dense model always runs beside them)."""
    levels = stats.layers[0].levels
    errors = [s.errors for s in stats.layers]

    def make(allocation: str, target: float) -> Candidate:
        idx = allocate_greedy(errors, levels, target) if allocation == "greedy" else [levels.index(
            round(target, 6) if round(target, 6) in levels else target)] * L
        return Candidate(f"{allocation} {target:g}", allocation, target, idx)

    allocations = ["greedy", "uniform"] if opts.allocation == "best" else \
        [opts.allocation] + (["uniform"] if opts.compare_uniform and opts.allocation != "uniform" else [])
    if opts.sparsity is not None:
        if opts.sparsity == 0:
            return [Candidate("dense", "dense", 0.0, [0] * L)]
        return [make(a, opts.sparsity) for a in allocations]
    if opts.max_quality_loss == 0:  # nothing sparse is within a zero loss: the model stays dense
        return [Candidate("dense", "dense", 0.0, [0] * L)]
    return [make(a, s) for s in LADDER for a in allocations]


# -- memory ------------------------------------------------------------------------------------------

class Memory:
    """What calibration keeps, planned against `--dram-budget` before anything is loaded, and the
    process's peak RSS measured against it. The overhead (Python, torch, libraries) is measured as
    generate measures it: the RSS before any weight is loaded."""

    def __init__(self, b, budget, calib_tokens: int, heldout: dict, context: int, n_val: int, runs: int):
        bound_heap()
        start_runtime()  # torch's thread team starts before the overhead is measured
        self.overhead = current_rss()
        total = b.manifest["sizes"]["total_bytes"]
        self.budget = parse_size(budget, of=total, what="budget") if budget is not None else None
        c, spec = b.config, b.spec
        L, d, n_ff = c.num_hidden_layers, spec.d, spec.n_ff
        header, _ = b._resident_header()
        size = {k: e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k != "__metadata__"}
        float_factor = 1 if b.quantized else 4 // b.itemsize  # float bundles compute in float32
        head_name = _head_name(b)
        head = size.get(head_name, 0) * float_factor
        attention = sum(v for k, v in size.items() if k not in HEAD_NAMES) * float_factor
        # a layer's records (while read: the file's bytes and a copy of a region too), then its predictor
        # (the gate/up codes in two forms)
        layer = b.manifest["sizes"]["ffn_bytes"] // L * (3 if b.quantized else 3 * float_factor)
        eval_tokens = sum(len(chunk) for chunks in heldout.values() for chunk in chunks)
        kv = L * context * c.num_key_value_heads * c.head_dim * 2 * 4
        sequence = context * n_ff * 4 * 5 + b.family.model.work_bytes_for(c, context, context)
        val = min(n_val, VAL_TOKENS) * (n_ff * 4 * 5 + d * 4) + CUT_SAMPLE * 4 * 3
        errors = ERROR_TOKENS * n_ff * 4 * 6 + SAMPLE * 4 * 2
        work = Workspace.bytes_for(d) * 2
        calibration = calib_tokens * d * 4 + attention + kv + layer + sequence + val + errors
        evaluation = runs * eval_tokens * d * 4 + max(attention + kv + layer + sequence, head + SCORE_ROWS * c.vocab_size * 16)
        self.parts = {"calibration pass": calibration, "evaluation pass": evaluation,
                      "of which hidden states": runs * eval_tokens * d * 4}
        # the parts above less what they leave out (allocator slack, small temporaries): measured peaks
        # on SmolLM2-135M came to 1.12x of the parts, so the plan keeps a quarter more
        self.planned = int(PLAN_MARGIN * (work + max(calibration, evaluation)))
        if self.budget is not None and self.planned > self.budget:
            parts = ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in self.parts.items())
            raise FlashLLMError(f"--dram-budget {self.budget / 1e6:.0f} MB: calibrating needs about "
                                f"{self.planned / 1e6:.0f} MB ({parts}); give a larger budget or fewer --tokens / "
                                f"--eval-tokens")

    def report(self) -> dict:
        return {"budget_bytes": self.budget, "planned_bytes": self.planned, "overhead_bytes": self.overhead,
                "peak_rss_bytes": peak_rss()}


# -- the model, a layer at a time --------------------------------------------------------------------

def _model(b):
    """The model over the bundle's resident weights as stored (quantized rows stay quantized, float
    ones computed in float32), with the embedding and head tables left out (see _load_head)."""
    weights = {}
    for name, t in b.resident_tensors(skip=HEAD_NAMES):
        weights[name] = t if isinstance(t, QRows) else t.float()
    placeholder = torch.zeros(0)
    model = b.family.model(b.config, {**weights, **{k: placeholder for k in HEAD_NAMES}}, torch.float32)
    for k in HEAD_NAMES:
        del model.weights[k]
    if hasattr(model, "lm_head"):
        model.lm_head = None
    width = max(model.quantized_width, b.spec.d)
    model.use_workspace(Workspace(width))
    return model


def _load_head(model, b, names: tuple[str, ...]) -> None:
    """Load the embedding and/or head tables (whichever `names` the bundle has) into the model."""
    for name, t in b.resident_tensors(skip=tuple(k for k in _resident_names(b) if k not in names)):
        t = t if isinstance(t, QRows) else t.float()
        model.weights[name] = t if name == "embed.weight" else for_compute(t)
    if hasattr(model, "lm_head"):
        tied = getattr(model.config, "tie_word_embeddings", True) or "lm_head.weight" not in model.weights
        model.lm_head = model.weights.get("embed.weight" if tied else "lm_head.weight")


def _drop_head(model) -> None:
    for k in HEAD_NAMES:
        model.weights.pop(k, None)
    if hasattr(model, "lm_head"):
        model.lm_head = None


def _head_name(b) -> str:
    """The table the head multiplies by: lm_head.weight, or the embeddings where they are tied."""
    return "lm_head.weight" if "lm_head.weight" in _resident_names(b) else "embed.weight"


def _resident_names(b) -> list[str]:
    header, _ = b._resident_header()
    return [k for k in header if k != "__metadata__"]


def _embed(model, b, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    _load_head(model, b, ("embed.weight",))
    out = [model.embed(s, 0).float() for s in sequences]
    _drop_head(model)
    return out


def layer_ffn(b, layer: int) -> dict[str, torch.Tensor | QRows]:
    """One layer's FFN as stored: quantized parts as QRows (down as its columns), float ones as float32."""
    return {k.split(".", 2)[2]: (v if isinstance(v, QRows) else v.float())
            for k, v in b.dense_ffn(layer, keep_quantized=True).items()}


def coefficients(spec: FFNSpec, x: torch.Tensor, ffn: dict, work: Workspace) -> torch.Tensor:
    return neuron_coefficients(spec, x, ffn.get("ffn.gate.weight"), ffn["ffn.up.weight"], ffn.get("ffn.up.bias"),
                               work)


def ffn_sum(a: torch.Tensor, ffn: dict, work: Workspace) -> torch.Tensor:
    down = ffn["ffn.down.weight"]
    if isinstance(down, QRows):
        return ffn_over_rows(a, down, torch.float32, work)
    return F.linear(a, down)  # float down [d, n_ff]


def float_ffn(ffn: dict) -> dict[str, torch.Tensor]:
    """The layer's gate/up (and up bias) as float32 matrices, for a requantized int4 predictor."""
    return {k: dequantize_rows(v) if isinstance(v, QRows) else v for k, v in ffn.items() if k != "ffn.down.weight"}


# -- held-out text per domain ------------------------------------------------------------------------

def heldout_chunks(corpus_name, text, encode, render, eval_tokens: int, context: int,
                   bos: int | None) -> dict[str, list[torch.Tensor]]:
    """Chunks of each domain's held-out split (eval_tokens in all, shared equally): every built-in domain
    for builtin:all, else the corpus's own held-out split. Domains with too little text are left out."""
    name = str(corpus_name)
    if name == f"{BUILTIN}:all":
        sources = [(domain, builtin_corpus(domain)) for domain in DOMAINS]
    elif name.startswith(BUILTIN + ":"):
        sources = [(name[len(BUILTIN) + 1:], text)]
    elif name == BUILTIN:
        sources = [("docs", text)]
    else:
        sources = [("held-out", text)]
    if eval_tokens <= 0:
        return {}
    out = {}
    for domain, corpus in sources:
        ids = corpus.tokens("heldout", encode, eval_tokens // len(sources), render)
        if len(ids) >= MIN_EVAL_TOKENS:
            out[domain] = chunks_of(ids, min(context, len(ids)), bos)
    return out


# -- pass 1: calibration -----------------------------------------------------------------------------

def int4_predictor(spec: FFNSpec, ffn: dict, group: int | None) -> tuple[Int4Predictor, bool]:
    """The layer's int4 predictor and whether it is the bundle's own gate/up (an int4 bundle's rows,
    used as they are) rather than a requantized copy."""
    gate, up = ffn.get("ffn.gate.weight"), ffn.get("ffn.up.weight")
    own = (group in (None, GROUP) and spec.gated and isinstance(gate, QRows) and isinstance(up, QRows)
           and gate.kind == up.kind == "int4")
    predictor = Int4Predictor.from_qrows(spec, gate, up) if own else Int4Predictor.from_ffn(spec, float_ffn(ffn), group)
    predictor.matrix.prepare(keep=True)  # the kernel's form for speed, the storage form for saving
    return predictor, own


def calibration_pass(b, groups: dict[str, list[torch.Tensor]], levels: list[float], opts, ranks: list[int],
                     epochs: int, seed: int, group: int | None, writer, progress=None) -> CalibrationStats:
    """Pass 1 (see the module's docstring); writes each layer's predictor into `writer` as it is built."""
    spec, L = b.spec, b.config.num_hidden_layers
    context = max(len(s) for seqs in groups.values() for s in seqs)
    model = _model(b)
    model.limit_context(context)
    work = model.workspace
    g = torch.Generator().manual_seed(seed)
    h = {k: _embed(model, b, seqs) for k, seqs in groups.items()}
    cache = model.new_cache(context)
    stats = CalibrationStats()
    recalls = sorted({*RECALL_GRID, opts.recall})
    key = f"{opts.recall:g}"
    n_train = max(1, len(h["train"]))
    per_seq_sample = max(1, SAMPLE // n_train)
    per_seq_error = max(1, -(-ERROR_TOKENS // n_train))
    train_level = levels.index(round(opts.sparsity, 6)) if opts.sparsity else 0
    with torch.no_grad():
        for layer in range(L):
            t0 = time.perf_counter()
            ffn = layer_ffn(b, layer)
            model.weights.update({f"layers.{layer}.{k}": v for k, v in ffn.items()})
            samples, x_val, a_val, a_err, xs_train, a_train = [], [], [], [], [], []
            for k in ("train", "val"):
                for i, hi in enumerate(h[k]):
                    hi = model.attention(layer, hi, 0, cache)
                    x = model.ffn_input(layer, hi)  # [T, d]
                    a = coefficients(spec, x, ffn, work)  # [T, n_ff]
                    h[k][i] = hi + model.ffn_output(layer, ffn_sum(a, ffn, work))
                    if k == "val":  # the cuts are tuned on CUT_SAMPLE values: VAL_TOKENS tokens hold enough
                        keep = VAL_TOKENS - sum(len(v) for v in x_val)
                        if keep > 0:
                            x_val.append(x[:keep].clone())
                            a_val.append(a[:keep].clone())
                        continue
                    samples.append(abs_sample(a, per_seq_sample, g))
                    # evenly spaced, past the first token (its massive activations are no typical token's)
                    rows = torch.arange(1, a.shape[0], max(1, (a.shape[0] - 1) // per_seq_error))[:per_seq_error]
                    a_err.append(a[rows])
                    if opts.kind == "lowrank":
                        xs_train.append(x)
                        a_train.append(a)
                    del a
            sample = torch.sort(torch.cat(samples)).values
            del samples
            thresholds = [sparsity_threshold(sample, s) for s in levels] if spec.gated else [0.0]
            errors = _errors(torch.cat(a_err), ffn, work, thresholds, spec) if spec.gated else [0.0]
            active = sample[sample > thresholds[train_level]]
            scale = float(active[active.numel() // 2]) if active.numel() else 1.0  # median active |a|
            del sample, active, a_err
            stats.collect_seconds += time.perf_counter() - t0
            if progress:
                progress(layer, L, f"layer {layer}: " + ("training rank " + str(ranks[layer]) if opts.kind == "lowrank"
                                                         else "4-bit gate/up"))
            t1 = time.perf_counter()
            xv, av = torch.cat(x_val), torch.cat(a_val)
            pinned, fixed_cuts = [], None
            if opts.kind == "int4":
                predictor, own = int4_predictor(spec, ffn, group)
                stats.own_layers += own
                stats.int4_rows, stats.int4_group = predictor.matrix.rows, predictor.matrix.group
            else:
                magnitude = torch.cat(a_train).abs_().div_(max(scale, 1e-12))
                masks = [active_mask(spec, a, thresholds[train_level]) for a in a_train]
                with torch.enable_grad():
                    fit = train_layer(torch.cat(xs_train), torch.cat(masks), xv,
                                      active_mask(spec, av, thresholds[train_level]), ranks[layer], opts.recall,
                                      epochs, seed=seed + layer, magnitude=magnitude)
                predictor, pinned, fixed_cuts = fit.predictor, fit.pinned, fit.decision_table
                stats.lowrank.append(predictor)
                del magnitude, masks, xs_train, a_train
            logits = torch.cat([predictor.logits(xv[i:i + 4096]) for i in range(0, xv.shape[0], 4096)])
            cuts, counts, distinct, predicted_distinct = [], [], [], []
            pick = torch.randperm(logits.numel(), generator=g)[:CUT_SAMPLE] if logits.numel() > CUT_SAMPLE else None
            window = min(WINDOW_TOKENS, len(a_val[0]))  # the first validation sequence's first tokens
            for j, t in enumerate(thresholds):
                y = active_mask(spec, av, t)
                if fixed_cuts is not None and j == train_level:
                    table = dict(fixed_cuts)
                elif float(y.float().mean()) >= ALWAYS_ACTIVE:
                    table = {f"{r:g}": ALL_LOGIT for r in recalls}
                else:
                    ys, ls = (y.flatten()[pick], logits.flatten()[pick]) if pick is not None else (y, logits)
                    positives = torch.sort(ls[ys].float()).values
                    table = {f"{r:g}": _kth_cut(positives, r) for r in recalls}
                pred = logits >= table[key]
                counts.append({"key": key, "true": float(y.float().mean()), "predicted": float(pred.float().mean()),
                               "hits": float((y & pred).float().mean())})
                cuts.append(table)
                distinct.append(mean_window([y[:window]]))
                predicted_distinct.append(mean_window([pred[:window]]))
            stored = predictor.stored_bytes
            writer.add(layer, predictor)
            del predictor, logits, xv, av, x_val, a_val
            for k in list(model.weights):
                if k.startswith(f"layers.{layer}.ffn."):
                    del model.weights[k]
            del ffn
            stats.layers.append(LayerStats(list(levels), thresholds if spec.gated else [0.0], errors, cuts, counts,
                                           distinct, predicted_distinct, pinned, time.perf_counter() - t1, stored))
            if progress:
                progress(layer + 1, L, f"layer {layer}: calibrated")
    return stats


def _kth_cut(positives: torch.Tensor, recall: float) -> float:
    """The largest logit cut keeping a share >= recall of these (sorted) positives' logits."""
    if positives.numel() == 0:
        return 0.0
    return float(positives[cut_rank(positives.numel(), recall) - 1])


def _errors(a: torch.Tensor, ffn: dict, work: Workspace, thresholds: list[float], spec: FFNSpec) -> list[float]:
    """Per level: ||FFN output of the neurons it drops||^2 / ||FFN output||^2 over these tokens, in the
    output dimensions that are not outliers (mean |y| within OUTLIER_FACTOR of the median dimension's).

    Two measures that let a few huge values set the scale failed: against the residual stream (||h||^2)
    the error looked smallest where a few massive dimensions make ||h|| large, and the greedy allocation
    put 60-90% sparsity there; against the whole FFN output, a layer whose output is one huge neuron's
    (SmolLM2's layer 11) looked free to drop 95% of the rest. Both cost 3-5% perplexity at a mean sparsity
    where uniform cost under 1% (SmolLM2-135M, README)."""
    y = ffn_sum(a, ffn, work)  # [T, d]
    size = y.abs().mean(0)
    normal = size <= OUTLIER_FACTOR * size.median()
    norm = float(y[:, normal].double().pow(2).sum())
    out = []
    for t in thresholds:
        if t <= 0:
            out.append(0.0)
            continue
        dropped = a * ~active_mask(spec, a, t)
        out.append(float(ffn_sum(dropped, ffn, work)[:, normal].double().pow(2).sum()) / max(norm, 1e-30))
    return out
