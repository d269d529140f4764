"""`train-predictor`: calibrate thresholds, build one predictor per layer, choose each layer's sparsity
for a quality target, measure it on held-out text of every domain, and save the predictors into the
bundle. The model runs layer by layer over the corpus (sparsity/calibrate.py), so only one layer's FFN
weights, predictor, inputs and active sets are in memory at a time."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flashllm.bundle.reader import Bundle, is_bundle
from flashllm.corpus import load_corpus
from flashllm.errors import FlashLLMError
from flashllm.models.ffn import FFNSpec
from flashllm.models.quant import GROUP_SIZES
from flashllm.sparsity import calibrate, scoring
from flashllm.sparsity.lowrank import (ALL_LOGIT, ALWAYS_ACTIVE, DEFAULT_EPOCHS, DEFAULT_RECALL,  # noqa: F401
                                       RECALL_GRID, LayerFit, decision_threshold, train_layer)
from flashllm.sparsity.predictors import FORMAT, FORMAT_VERSION, KINDS, PredictorWriter, Predictors, load_predictors
from flashllm.sparsity.thresholds import THRESHOLD_GRID, WINDOW_K, Progress
from flashllm.tokenizer import Tokenizer

DEFAULT_SPARSITY = 0.5  # of --kind lowrank on a gated FFN (trained against one threshold per layer)
DEFAULT_QUALITY_LOSS = 1.0  # percent perplexity over dense on every held-out domain: the default target
DEFAULT_MIN_AGREEMENT = 0.95  # top-1 agreement with dense on every held-out domain
DEFAULT_CORPUS = "builtin:all"  # docs, code and chat interleaved; held-out splits scored per domain
ALLOCATIONS = ("uniform", "greedy", "best")  # best: score both, keep the sparsest within the target
DEFAULT_TOKENS = 8_192  # int4: the quantiles and cuts need no more
DEFAULT_LOWRANK_TOKENS = 24_576  # a trained predictor does
MIN_TRAIN_TOKENS = 64
DEFAULT_EVAL_TOKENS = 3_072  # shared by the held-out domains
DEFAULT_CONTEXT = 512
LAST_LAYERS = 4  # the paper gives the last layers a larger rank
VALIDATION_SHARE = 0.1  # of the training tokens, for the decision thresholds
@dataclass
class TrainResult:
    folder: Path
    report: dict
    seconds: float

    @property
    def predictors(self) -> Predictors:
        """The predictors as saved (loaded on use: calibration keeps one layer's at a time)."""
        return load_predictors(self.folder)


def default_ranks(spec: FFNSpec, n_layers: int, rank: int | None, last_rank: int | None) -> list[int]:
    """`rank` for every layer, `last_rank` (default 2 x rank) for the last LAST_LAYERS; both below d."""
    base = rank if rank is not None else min(128, max(32, spec.d // 8 // 16 * 16), spec.d - 1)
    last = last_rank if last_rank is not None else min(2 * base, spec.d - 1)
    for name, r in (("--rank", base), ("--last-rank", last)):
        if r < 1:
            raise FlashLLMError(f"{name} {r}: must be at least 1")
        if r >= spec.d:
            raise FlashLLMError(f"{name} {r}: must be below the model width d = {spec.d} (a predictor of rank "
                                f">= d is no cheaper than the layer itself)")
    return [last if i >= n_layers - LAST_LAYERS else base for i in range(n_layers)]


def _open_bundle(folder: Path):
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise FlashLLMError(f"{folder}: no such folder")
    if not is_bundle(folder):
        raise FlashLLMError(f"{folder}: not a bundle folder (no manifest.json); make one with `flashllm convert`")
    return Bundle(folder)


def _sequences(ids: list[int], context: int, bos: int | None = None) -> list[torch.Tensor]:
    """Token ids cut into sequences of `context` (the last one may be shorter, but not tiny); each
    starts with BOS when the tokenizer adds one, as perplexity's chunks do."""
    seqs = [torch.tensor(ids[i:i + context]) for i in range(0, len(ids), context)]
    if len(seqs) > 1 and len(seqs[-1]) < context // 4:
        seqs.pop()
    if bos is not None:
        for seq in seqs:
            seq[0] = bos
    return seqs


@dataclass
class Options:
    """What train-predictor was asked, checked (see train_predictors)."""

    kind: str
    sparsity: float | None  # a fixed mean sparsity (None: chosen by the quality target)
    max_quality_loss: float | None  # percent perplexity on every held-out domain
    min_agreement: float
    allocation: str
    compare_uniform: bool
    recall: float


def _check_options(spec: FFNSpec, kind, sparsity, max_quality_loss, min_agreement, allocation, compare_uniform,
                   recall, rank, last_rank, group, eval_tokens) -> Options:
    if sparsity is not None and not spec.gated:
        raise FlashLLMError("--sparsity applies to gated FFNs; a ReLU FFN's sparsity is natural (a > 0)")
    if sparsity is not None and max_quality_loss is not None:
        raise FlashLLMError("give --sparsity or --max-quality-loss, not both")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise FlashLLMError(f"--sparsity {sparsity}: must be in [0, 1)")
    if max_quality_loss is not None and not 0.0 <= max_quality_loss <= 100.0:
        raise FlashLLMError(f"--max-quality-loss {max_quality_loss}: must be a percentage in [0, 100]")
    if not 0.0 <= min_agreement <= 1.0:
        raise FlashLLMError(f"--min-agreement {min_agreement}: must be in [0, 1]")
    if allocation not in ALLOCATIONS:
        raise FlashLLMError(f"unknown --allocation {allocation!r} (choose from {', '.join(ALLOCATIONS)})")
    if not 0.0 < recall <= 1.0:
        raise FlashLLMError(f"--recall {recall}: must be in (0, 1]")
    kind = kind or ("int4" if spec.gated else "lowrank")
    if kind not in KINDS:
        raise FlashLLMError(f"unknown predictor kind {kind!r} (choose from {', '.join(KINDS)})")
    if kind == "int4":
        if rank is not None or last_rank is not None:
            raise FlashLLMError("--rank/--last-rank apply to --kind lowrank; int4 predictors have no rank")
        if group is not None and (group not in GROUP_SIZES or spec.d % group):
            raise FlashLLMError(f"--group {group}: must be one of {', '.join(map(str, GROUP_SIZES))} and divide "
                                f"d = {spec.d}")
        if spec.d % GROUP_SIZES[0]:
            raise FlashLLMError(f"int4 predictors need d divisible by {GROUP_SIZES[0]} (d = {spec.d}); "
                                f"use --kind lowrank")
    elif group is not None:
        raise FlashLLMError("--group applies to --kind int4")
    if not spec.gated:  # a ReLU FFN: a > 0 is exact, there is nothing to choose
        sparsity, max_quality_loss = 0.0, None
    elif kind == "lowrank" and sparsity is None:
        if max_quality_loss is not None:
            raise FlashLLMError("--max-quality-loss needs --kind int4: a trained low-rank predictor fits one "
                                "threshold per layer, known before training; give --sparsity")
        sparsity = DEFAULT_SPARSITY
    elif sparsity is None and max_quality_loss is None:
        max_quality_loss = DEFAULT_QUALITY_LOSS
    if max_quality_loss is not None and eval_tokens <= 0:
        raise FlashLLMError("a quality target needs held-out text to measure it on (--eval-tokens > 0); "
                            "or give --sparsity")
    if kind == "lowrank" and sparsity is not None and allocation != "uniform":
        allocation = "uniform"  # trained against one threshold per layer: the uniform one
    return Options(kind, sparsity, max_quality_loss, min_agreement, allocation, compare_uniform, recall)


def train_predictors(bundle: Path, corpus: str | Path | None = None, tokens: int | None = None,
                     rank: int | None = None, last_rank: int | None = None, sparsity: float | None = None,
                     recall: float = DEFAULT_RECALL, context: int = DEFAULT_CONTEXT,
                     eval_tokens: int = DEFAULT_EVAL_TOKENS, epochs: int = DEFAULT_EPOCHS, seed: int = 0,
                     progress: Progress | None = None, kind: str | None = None, group: int | None = None,
                     max_quality_loss: float | None = None, min_agreement: float = DEFAULT_MIN_AGREEMENT,
                     allocation: str = "uniform", compare_uniform: bool = False,
                     dram_budget: str | int | None = None) -> TrainResult:
    """Calibrate thresholds, build one predictor per layer, choose the sparsity of each layer, measure
    the result on held-out text of every domain, and save the predictors into the bundle.

    Two passes over the layers (sparsity/calibrate.py): the first runs the training text through the
    model layer by layer (hidden states of every sequence advance through layer l, dense), collecting
    per layer the |a| quantiles, what dropping each share costs (the FFN output error), and the
    predictor's decision cuts for each share; the second runs the held-out text of each domain through
    the dense model and the candidate allocations side by side, layer by layer, and scores them. With
    --max-quality-loss (the default) the sparsest candidate within the target on every domain wins;
    with --sparsity the one allocation asked is measured. Only one layer's FFN and predictor are in
    memory at a time, and the predictors are written layer by layer."""
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    b = _open_bundle(bundle)
    spec, config = b.spec, b.config
    L = config.num_hidden_layers
    opts = _check_options(spec, kind, sparsity, max_quality_loss, min_agreement, allocation, compare_uniform,
                          recall, rank, last_rank, group, eval_tokens)
    if opts.kind == "lowrank" and dram_budget is not None:
        raise FlashLLMError("--dram-budget applies to --kind int4 (a low-rank predictor trains on every "
                            "training token's activations at once)")
    ranks = [0] * L if opts.kind == "int4" else default_ranks(spec, L, rank, last_rank)
    tokens = tokens if tokens is not None else (DEFAULT_TOKENS if opts.kind == "int4" else DEFAULT_LOWRANK_TOKENS)
    tokenizer = Tokenizer.from_folder(b.folder)
    if tokenizer is None:
        raise FlashLLMError(f"{b.folder}: the bundle has no tokenizer.json")
    text = load_corpus(corpus if corpus is not None else DEFAULT_CORPUS)
    encode = lambda s: tokenizer.encode(s, add_bos=False)  # noqa: E731
    render = (lambda m: tokenizer.render_chat(m, add_generation_prompt=False)) if tokenizer.chat_template else None
    train_ids = text.tokens("train", encode, tokens, render)  # chat documents through the model's template
    if len(train_ids) < MIN_TRAIN_TOKENS:
        raise FlashLLMError(f"the corpus has only {len(train_ids)} training tokens; at least {MIN_TRAIN_TOKENS} "
                            f"are needed")
    bos = tokenizer.bos_token_id if tokenizer.add_bos else None
    heldout = calibrate.heldout_chunks(corpus if corpus is not None else DEFAULT_CORPUS, text, encode, render,
                                       eval_tokens, context, bos)
    if opts.max_quality_loss is not None and not heldout:
        raise FlashLLMError(f"the corpus's held-out split has fewer than {calibrate.MIN_EVAL_TOKENS} tokens to "
                            f"measure the quality target on; give --sparsity")
    n_val = max(1, int(len(train_ids) * VALIDATION_SHARE))
    groups = {"train": _sequences(train_ids[:-n_val], context, bos), "val": _sequences(train_ids[-n_val:], context, bos)}
    levels = calibrate.levels_for(opts.sparsity, spec.gated)
    kinds = 2 if opts.allocation == "best" or opts.compare_uniform else 1
    runs = 1 + kinds * (1 if opts.sparsity is not None else len(calibrate.LADDER))
    memory = calibrate.Memory(b, dram_budget, sum(len(s) for seqs in groups.values() for s in seqs), heldout,
                              context, n_val, runs)
    with PredictorWriter(b.folder) as writer:
        stats = calibrate.calibration_pass(b, groups, levels, opts, ranks, epochs, seed, group, writer, progress)
        candidates = calibrate.candidates(stats, opts, L)
        quality = scoring.evaluation_pass(b, heldout, candidates, stats, opts, group, progress) \
            if heldout else None
        chosen = scoring.choose(candidates, quality, opts)
        settings, report = _settings_and_report(b, text, stats, chosen, candidates, quality, opts, ranks,
                                                len(train_ids), n_val, context, memory)
        report["overall"]["total_seconds"] = time.perf_counter() - start
        report["overall"]["cpu_seconds"] = time.process_time() - cpu_start  # robust to a busy machine
        settings["report"] = report
        writer.finish(settings)
    return TrainResult(b.folder, report, time.perf_counter() - start)


def _settings_and_report(b: Bundle, text, stats, chosen, candidates, quality, opts: Options, ranks: list[int],
                         n_train: int, n_val: int, context: int, memory) -> tuple[dict, dict]:
    spec, L = b.spec, b.config.num_hidden_layers
    idx = chosen.levels
    key = f"{opts.recall:g}"
    layer_stats = stats.layers
    thresholds = [s.thresholds[i] for s, i in zip(layer_stats, idx)]
    rows = [s.row(layer, i, ranks[layer]) for layer, (s, i) in enumerate(zip(layer_stats, idx))]
    first = layer_stats[0]
    settings = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "sparsity": chosen.mean_level(stats), "gated": spec.gated, "target_recall": opts.recall,
        "allocation": chosen.allocation,
        "layer_sparsity": [s.levels[i] for s, i in zip(layer_stats, idx)],
        "activation_thresholds": thresholds,
        "decision_thresholds": [s.cuts[i][key] for s, i in zip(layer_stats, idx)],
        "decision_threshold_kind": "logit (a neuron is predicted when its logit >= the threshold)",
        "decision_table": {r: [s.cuts[i][r] for s, i in zip(layer_stats, idx)] for r in first.cuts[0]},
        "pinned": [s.pinned for s in layer_stats],
        "ranks": ranks,
        "kind": opts.kind, "n_ff": spec.n_ff,
        **({"int4_rows": stats.int4_rows, "int4_group": stats.int4_group, "int4_activation": spec.activation if
            spec.gated else "",
            # "bundle": every layer's predictor is its own int4 gate/up, so gate/up from DRAM is exact
            "int4_source": "bundle" if stats.own_layers == L else "requantized"} if opts.kind == "int4" else {}),
        "window_stats": {"K": WINDOW_K, "distinct": [s.distinct[i] for s, i in zip(layer_stats, idx)],
                         "predicted_distinct": [s.predicted_distinct[i] for s, i in zip(layer_stats, idx)],
                         "n_ff": spec.n_ff, "tokens": "validation"},
        "threshold_table": {f"{s:.2f}": [ls.thresholds[ls.levels.index(s)] if spec.gated else 0.0
                                         for ls in layer_stats] for s in THRESHOLD_GRID},
        "corpus": {"description": text.description, "train_tokens": n_train - n_val,
                   "validation_tokens": n_val, "heldout_tokens": quality.tokens if quality else 0,
                   "context": context},
    }
    report = {"layers": rows, "overall": _overall(rows, stats, b.manifest["sizes"]["total_bytes"])}
    report["quality"] = quality.summary(chosen) if quality else None
    report["selection"] = scoring.selection_report(candidates, quality, chosen, opts)
    report["memory"] = memory.report()
    return settings, report


def _overall(rows: list[dict], stats, model_bytes: int) -> dict:
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731  every layer has n_ff neurons
    true, predicted = mean("true_active"), mean("predicted_active")
    recall = sum(r["recall"] * r["true_active"] for r in rows) / max(1e-12, sum(r["true_active"] for r in rows))
    stored = sum(r["stored_bytes"] for r in rows)
    return {"true_active": true, "predicted_active": predicted, "recall": recall,
            "precision": recall * true / predicted if predicted else 1.0, "sparsity": 1 - true,
            "predictor_bytes": stored, "predictor_percent_of_model": 100 * stored / model_bytes,
            "model_bytes": model_bytes, "train_seconds": sum(r["train_seconds"] for r in rows),
            "collect_seconds": stats.collect_seconds}
