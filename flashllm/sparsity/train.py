"""`train-predictor`: calibrate thresholds, fit one predictor per layer, measure them on held-out text,
and save them into the bundle. The model runs layer by layer over the corpus, so only one layer's FFN
weights, inputs and active sets are in memory at a time."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from flashllm.bundle.reader import Bundle, is_bundle
from flashllm.corpus import load_corpus
from flashllm.errors import FlashLLMError
from flashllm.models.ffn import FFNSpec, active_mask
from flashllm.models.qrows import GROUP, QRows
from flashllm.models.quant import GROUP_SIZES
from flashllm.sparsity.predictors import FORMAT, FORMAT_VERSION, KINDS, Int4Predictor, LayerPredictor, Predictors
from flashllm.sparsity.quality import evaluate
from flashllm.sparsity.thresholds import (THRESHOLD_GRID, THRESHOLD_SAMPLE, WINDOW_K, Progress, abs_sample,
                                          model_coefficients, sparsity_threshold, window_distinct)
from flashllm.tokenizer import Tokenizer

DEFAULT_SPARSITY = 0.5
DEFAULT_RECALL = 0.99
DEFAULT_TOKENS = 24_576
DEFAULT_EVAL_TOKENS = 8_192
DEFAULT_CONTEXT = 512
DEFAULT_EPOCHS = 3
LAST_LAYERS = 4  # the paper gives the last layers a larger rank
VALIDATION_SHARE = 0.1  # of the training tokens, for the decision thresholds
MIN_EVAL_TOKENS = 16
RECALL_GRID = [0.8, 0.9, 0.95, 0.98, 0.99, 0.995]  # decision cuts stored for each, chosen at run time
MAGNITUDE_CLIP = 10.0  # a positive weighs at most this many times more in the loss
PIN_FACTOR = 50.0  # a neuron is pinned when the predictor misses a coefficient 50x the median active one
PIN_LOGIT = 1000.0  # the bias of a pinned neuron: above any decision cut, exact in float16
ALWAYS_ACTIVE = 0.999  # a layer whose neurons are active this often gets an all-on predictor
ALL_LOGIT = -1e30  # a decision cut below any logit: every neuron predicted



@dataclass
class LayerFit:
    predictor: LayerPredictor  # float32, values exactly representable in float16 (what is saved)
    decision_threshold: float
    decision_table: dict[str, float]  # recall target -> logit cut, tuned on the validation slice
    pinned: list[int]  # neurons always predicted (large coefficients the predictor missed)
    seconds: float
    val_recall: float


def train_layer(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, rank: int,
                recall: float = DEFAULT_RECALL, epochs: int = DEFAULT_EPOCHS, batch: int = 1024,
                lr: float = 2e-2, seed: int = 0, magnitude: torch.Tensor | None = None) -> LayerFit:
    """Fit Linear(d->r) -> Linear(r->n_ff) to y = active set of x, then pick the logit cut that reaches
    `recall` on (x_val, y_val). x: [N, d] float, y: [N, n_ff] bool.

    magnitude ([N, n_ff], |a| over the median active |a|), when given, weighs each positive by its
    size (clipped to 1..MAGNITUDE_CLIP) since a missed large coefficient costs more than a small one,
    and pins the few neurons whose missed coefficients are huge (the massive activations of the first
    token of a sequence): they are always predicted, at the cost of reading a handful of neurons."""
    start = time.perf_counter()
    d, n_ff = x.shape[1], y.shape[1]
    positive = y.float().mean(0)  # [n_ff] per-neuron rate
    rate = float(positive.mean())
    if rate >= ALWAYS_ACTIVE or rate <= 0.0:  # (almost) always / never active: a constant predictor
        # (t = 0 on a gated FFN drops only exact zeros; predicting all keeps that exactly dense)
        predictor = LayerPredictor(torch.zeros(rank, d), torch.zeros(n_ff, rank),
                                   torch.full((n_ff,), 1.0 if rate >= ALWAYS_ACTIVE else -1.0))
        return LayerFit(predictor, 0.0, {f"{r:g}": 0.0 for r in sorted({*RECALL_GRID, recall})}, [],
                         time.perf_counter() - start, 1.0)
    g = torch.Generator().manual_seed(seed)
    w_in = (torch.randn(rank, d, generator=g) / math.sqrt(d)).requires_grad_()
    w_out = (torch.randn(n_ff, rank, generator=g) / math.sqrt(rank) * 0.1).requires_grad_()
    b_out = torch.logit(positive.clamp(1e-3, 1 - 1e-3)).requires_grad_()  # start from each neuron's base rate
    balance = (1 - rate) / rate  # positives and negatives weigh the same in the loss
    opt = torch.optim.Adam([w_in, w_out, b_out], lr=lr, foreach=True)
    steps = epochs * max(1, -(-x.shape[0] // batch))
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch):
            rows = order[i:i + batch]
            target = y[rows].float()  # [B, n_ff]
            size = magnitude[rows].clamp(1, MAGNITUDE_CLIP) if magnitude is not None else 1.0
            weight = target * balance * size + (1 - target)
            logits = F.linear(F.linear(x[rows], w_in), w_out, b_out)  # [B, n_ff]
            loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    with torch.no_grad():  # round to what will be stored, then tune the cut on those very weights
        predictor = LayerPredictor(*(t.detach().to(torch.float16).float() for t in (w_in, w_out, b_out)))
        val_logits = predictor.logits(x_val)
        threshold = decision_threshold(val_logits, y_val, recall)
        pinned = []
        if magnitude is not None:
            missed = y & (_batched_logits(predictor, x) < threshold)  # [N, n_ff]
            worst = (magnitude * missed).amax(0)  # [n_ff] largest missed coefficient per neuron
            candidates = torch.nonzero(worst > PIN_FACTOR).flatten()
            pinned = candidates[worst[candidates].argsort(descending=True)][:max(1, n_ff // 100)].tolist()
            predictor.w_out[pinned] = 0.0
            predictor.b_out[pinned] = PIN_LOGIT
            val_logits = predictor.logits(x_val)
        threshold, table, val_recall = _decision_cuts(val_logits, y_val, recall)
    return LayerFit(predictor, threshold, table, sorted(pinned), time.perf_counter() - start, val_recall)


def _decision_cuts(val_logits: torch.Tensor, y_val: torch.Tensor, recall: float) -> tuple[float, dict, float]:
    """The cut for `recall`, the cuts for every recall in RECALL_GRID, and the recall reached on y_val."""
    table = {f"{r:g}": decision_threshold(val_logits, y_val, r) for r in sorted({*RECALL_GRID, recall})}
    threshold = decision_threshold(val_logits, y_val, recall)
    val_recall = float(((val_logits >= threshold) & y_val).sum() / y_val.sum().clamp(min=1))
    return threshold, table, val_recall


def int4_layer(spec: FFNSpec, ffn: dict[str, torch.Tensor], x_val: torch.Tensor, y_val: torch.Tensor,
               recall: float = DEFAULT_RECALL, group: int | None = None,
               own: tuple[QRows, QRows] | None = None) -> LayerFit:
    """The layer's gate/up in 4 bits as its predictor; only the decision cuts are tuned (on x_val).
    `own`: the layer's gate/up rows already in int4 (an int4 bundle): used as they are."""
    start = time.perf_counter()
    predictor = Int4Predictor.from_qrows(spec, *own) if own else Int4Predictor.from_ffn(spec, ffn, group)
    predictor.matrix.prepare(keep=True)  # the kernel's form for speed, the storage form for saving
    rate = float(y_val.float().mean()) if y_val.numel() else 1.0
    if rate >= ALWAYS_ACTIVE:  # (almost) always active: predict all (t = 0 then stays exactly dense)
        return LayerFit(predictor, ALL_LOGIT, {f"{r:g}": ALL_LOGIT for r in sorted({*RECALL_GRID, recall})}, [],
                        time.perf_counter() - start, 1.0)
    threshold, table, val_recall = _decision_cuts(_batched_logits(predictor, x_val), y_val, recall)
    return LayerFit(predictor, threshold, table, [], time.perf_counter() - start, val_recall)


def _own_int4(bundle: Bundle, layer: int, spec: FFNSpec) -> tuple[QRows, QRows] | None:
    """The layer's gate and up rows when the bundle keeps both in int4 (the model's own 4-bit weights)."""
    if not spec.gated or bundle.part_kinds.get("gate") != "int4":
        return None
    q = bundle.dense_ffn(layer, keep_quantized=True)
    gate, up = q.get(f"layers.{layer}.ffn.gate.weight"), q.get(f"layers.{layer}.ffn.up.weight")
    if isinstance(gate, QRows) and isinstance(up, QRows) and gate.kind == up.kind == "int4":
        return gate, up
    return None


def _batched_logits(predictor: LayerPredictor, x: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    return torch.cat([predictor.logits(x[i:i + rows]) for i in range(0, x.shape[0], rows)])


def decision_threshold(logits: torch.Tensor, y: torch.Tensor, recall: float) -> float:
    """The largest logit cut c with recall(logits >= c) >= `recall` on these labels."""
    positives = logits[y]
    if positives.numel() == 0:
        return float(logits.max()) + 1.0 if logits.numel() else 0.0
    k = int(math.floor(positives.numel() * (1 - recall))) + 1  # positives below the cut: at most k - 1
    return float(torch.kthvalue(positives.float(), min(k, positives.numel())).values)



@dataclass
class TrainResult:
    folder: Path
    predictors: Predictors
    report: dict
    seconds: float


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


def train_predictors(bundle: Path, corpus: str | Path | None = None, tokens: int = DEFAULT_TOKENS,
                     rank: int | None = None, last_rank: int | None = None, sparsity: float | None = None,
                     recall: float = DEFAULT_RECALL, context: int = DEFAULT_CONTEXT,
                     eval_tokens: int = DEFAULT_EVAL_TOKENS, epochs: int = DEFAULT_EPOCHS, seed: int = 0,
                     progress: Progress | None = None, kind: str | None = None,
                     group: int | None = None) -> TrainResult:
    """Calibrate thresholds, train one predictor per layer, measure them, and save them into the bundle.

    The model runs layer by layer over the corpus: the hidden states of all sequences advance through
    layer l (dense), and only layer l's FFN weights, inputs and active sets are in memory at a time.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    b = _open_bundle(bundle)
    spec, config = b.spec, b.config
    L = config.num_hidden_layers
    if sparsity is not None and not spec.gated:
        raise FlashLLMError("--sparsity applies to gated FFNs; a ReLU FFN's sparsity is natural (a > 0)")
    if sparsity is None:
        sparsity = DEFAULT_SPARSITY if spec.gated else 0.0
    if not 0.0 <= sparsity < 1.0:
        raise FlashLLMError(f"--sparsity {sparsity}: must be in [0, 1)")
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
        ranks = [0] * L
    elif group is not None:
        raise FlashLLMError("--group applies to --kind int4")
    else:
        ranks = default_ranks(spec, L, rank, last_rank)
    tokenizer = Tokenizer.from_folder(b.folder)
    if tokenizer is None:
        raise FlashLLMError(f"{b.folder}: the bundle has no tokenizer.json")
    text = load_corpus(corpus)
    encode = lambda s: tokenizer.encode(s, add_bos=False)  # noqa: E731
    render = (lambda m: tokenizer.render_chat(m, add_generation_prompt=False)) if tokenizer.chat_template else None
    train_ids = text.tokens("train", encode, tokens, render)  # chat documents through the model's template
    heldout_ids = text.tokens("heldout", encode, eval_tokens, render) if eval_tokens > 0 else []
    minimum = 64
    if len(train_ids) < minimum:
        raise FlashLLMError(f"the corpus has only {len(train_ids)} training tokens; at least {minimum} are needed")
    n_val = max(1, int(len(train_ids) * VALIDATION_SHARE))
    bos = tokenizer.bos_token_id if tokenizer.add_bos else None
    groups = {"train": _sequences(train_ids[:-n_val], context, bos),
              "val": _sequences(train_ids[-n_val:], context, bos),
              "heldout": _sequences(heldout_ids, context, bos) if heldout_ids else []}

    weights = {name: t.float() for name, t in b.resident_tensors(expand=True)}
    model = b.family.model(config, weights, torch.float32)
    g = torch.Generator().manual_seed(seed)
    h = {k: [model.embed(s, 0) for s in seqs] for k, seqs in groups.items()}  # [T, d] per sequence
    cache = model.new_cache(context)  # every sequence starts at 0 and overwrites what it reads
    thresholds, table, layers, fits, rows = [], {s: [] for s in THRESHOLD_GRID}, [], [], []
    distinct, predicted_distinct = [], []
    collect_seconds = 0.0
    own_layers = 0  # int4 layers whose predictor is the bundle's own gate/up
    with torch.no_grad():
        for layer in range(L):
            t0 = time.perf_counter()
            ffn = {k.split(".", 2)[2]: v.float() for k, v in b.dense_ffn(layer).items()}
            model.weights.update({f"layers.{layer}.{k}": v for k, v in ffn.items()})
            xs, coeffs = {}, {}
            for k in groups:
                xs[k], coeffs[k] = [], []
                for i, hi in enumerate(h[k]):
                    hi = model.attention(layer, hi, 0, cache)
                    x = model.ffn_input(layer, hi)  # [T, d]
                    a = model_coefficients(model, layer, x)  # [T, n_ff]
                    h[k][i] = hi + model.ffn_output(layer, F.linear(a, ffn["ffn.down.weight"]))
                    xs[k].append(x)
                    coeffs[k].append(a)
            sample = torch.sort(torch.cat([abs_sample(a, THRESHOLD_SAMPLE // len(coeffs["train"]), g)
                                           for a in coeffs["train"]])).values
            t_l = sparsity_threshold(sample, sparsity) if spec.gated else 0.0
            thresholds.append(t_l)
            for s in THRESHOLD_GRID:
                table[s].append(sparsity_threshold(sample, s) if spec.gated else 0.0)
            masks = {k: [active_mask(spec, a, t_l) for a in coeffs[k]] for k in groups}
            active = sample[sample > t_l]
            scale = float(active[active.numel() // 2]) if active.numel() else 1.0  # median active |a|
            magnitude = torch.cat(coeffs["train"]).abs_().div_(max(scale, 1e-12))  # [N, n_ff]
            del coeffs, sample, active
            for k in list(model.weights):
                if k.startswith(f"layers.{layer}.ffn."):
                    del model.weights[k]
            collect_seconds += time.perf_counter() - t0
            if progress:
                progress(layer, L, f"layer {layer}: " + (f"training rank {ranks[layer]}" if kind == "lowrank"
                                                          else "4-bit gate/up"))
            if kind == "int4":
                own = _own_int4(b, layer, spec) if group in (None, GROUP) else None
                own_layers += own is not None
                fit = int4_layer(spec, ffn, torch.cat(xs["val"]), torch.cat(masks["val"]), recall, group, own)
            else:
                with torch.enable_grad():
                    fit = train_layer(torch.cat(xs["train"]), torch.cat(masks["train"]), torch.cat(xs["val"]),
                                      torch.cat(masks["val"]), ranks[layer], recall, epochs, seed=seed + layer,
                                      magnitude=magnitude)
            del magnitude
            fits.append(fit)
            layers.append(fit.predictor)
            eval_set = "heldout" if groups["heldout"] else "val"
            y = torch.cat(masks[eval_set])
            pred = [_batched_logits(fit.predictor, x) >= fit.decision_threshold for x in xs[eval_set]]
            rows.append(_layer_row(layer, y, torch.cat(pred), fit, spec))
            distinct.append(_mean_window([m for m in masks[eval_set]]))
            predicted_distinct.append(_mean_window(pred))
            if progress:
                progress(layer + 1, L, f"layer {layer}: recall {rows[-1]['recall']:.3f}")
    del h, xs, masks

    model_bytes = b.manifest["sizes"]["total_bytes"]
    settings = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "sparsity": sparsity, "gated": spec.gated, "target_recall": recall,
        "activation_thresholds": thresholds,
        "decision_thresholds": [f.decision_threshold for f in fits],
        "decision_threshold_kind": "logit (a neuron is predicted when its logit >= the threshold)",
        "decision_table": {r: [f.decision_table[r] for f in fits] for r in fits[0].decision_table},
        "pinned": [f.pinned for f in fits],
        "ranks": ranks,
        "kind": kind, "n_ff": spec.n_ff,
        **({"int4_rows": layers[0].matrix.rows, "int4_group": layers[0].matrix.group,
            "int4_activation": layers[0].activation,
            # "bundle": every layer's predictor is its own int4 gate/up, so gate/up from DRAM is exact
            "int4_source": "bundle" if own_layers == L else "requantized"} if kind == "int4" else {}),
        "window_stats": {"K": WINDOW_K, "distinct": distinct, "predicted_distinct": predicted_distinct,
                         "n_ff": spec.n_ff, "tokens": "heldout" if groups["heldout"] else "validation"},
        "threshold_table": {f"{s:.2f}": table[s] for s in THRESHOLD_GRID},
        "corpus": {"description": text.description, "train_tokens": len(train_ids) - n_val,
                   "validation_tokens": n_val, "heldout_tokens": len(heldout_ids), "context": context},
    }
    predictors = Predictors(layers, settings)
    report = {"layers": rows, "overall": _overall(rows, predictors, model_bytes, fits, collect_seconds)}
    report["quality"] = None
    if len(heldout_ids) >= MIN_EVAL_TOKENS:  # quality on the held-out split, by `flashllm perplexity`'s code
        weights.update({k: v.float() for layer in range(L) for k, v in b.dense_ffn(layer).items()})
        quality = evaluate(model, heldout_ids, min(context, len(heldout_ids)), ["oracle", "predictor"],
                           thresholds, predictors, bos=bos, progress=progress)
        report["quality"] = {mode: r.to_json() for mode, r in quality.items()}
    report["overall"]["total_seconds"] = time.perf_counter() - start
    report["overall"]["cpu_seconds"] = time.process_time() - cpu_start  # robust to a busy machine
    settings["report"] = report
    predictors.save(b.folder)
    return TrainResult(b.folder, predictors, report, time.perf_counter() - start)


def _layer_row(layer: int, y: torch.Tensor, pred: torch.Tensor, fit: LayerFit, spec: FFNSpec) -> dict:
    tp = int((y & pred).sum())
    true, predicted = int(y.sum()), int(pred.sum())
    total = y.numel()
    return {"layer": layer, "rank": fit.predictor.rank, "true_active": true / total,
            "predicted_active": predicted / total, "recall": tp / true if true else 1.0,
            "precision": tp / predicted if predicted else 1.0, "decision_threshold": fit.decision_threshold,
            "stored_bytes": fit.predictor.stored_bytes,
            "pinned": len(fit.pinned), "train_seconds": fit.seconds}


def _mean_window(masks: list[torch.Tensor]) -> list[float]:
    """Per-K mean of distinct counts over sequences, weighted by the windows each sequence has."""
    sums, counts = [0.0] * len(WINDOW_K), [0] * len(WINDOW_K)
    for m in masks:
        for j, (k, v) in enumerate(zip(WINDOW_K, window_distinct(m))):
            n = m.shape[0] - k + 1
            if n > 0:
                sums[j] += v * n
                counts[j] += n
    return [s / c if c else float("nan") for s, c in zip(sums, counts)]


def _overall(rows: list[dict], predictors: Predictors, model_bytes: int, fits: list[LayerFit],
             collect_seconds: float) -> dict:
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731  every layer has n_ff neurons
    true, predicted = mean("true_active"), mean("predicted_active")
    recall = sum(r["recall"] * r["true_active"] for r in rows) / max(1e-12, sum(r["true_active"] for r in rows))
    stored = sum(r["stored_bytes"] for r in rows)
    return {"true_active": true, "predicted_active": predicted, "recall": recall,
            "precision": recall * true / predicted if predicted else 1.0,
            "predictor_bytes": stored, "predictor_dram_bytes": predictors.nbytes,
            "predictor_percent_of_model": 100 * stored / model_bytes, "model_bytes": model_bytes,
            "train_seconds": sum(f.seconds for f in fits), "collect_seconds": collect_seconds}
