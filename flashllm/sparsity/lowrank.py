"""The low-rank predictor's training (the paper's: Deja Vu, LLM in a flash) and the decision cuts every
predictor kind is tuned with, shared by train-predictor's two passes (sparsity/calibrate.py)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashllm.sparsity.predictors import LayerPredictor
from flashllm.sparsity.thresholds import WINDOW_K, window_distinct

DEFAULT_RECALL = 0.99
DEFAULT_EPOCHS = 3
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


def _batched_logits(predictor: LayerPredictor, x: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    return torch.cat([predictor.logits(x[i:i + rows]) for i in range(0, x.shape[0], rows)])


def cut_rank(positives: int, recall: float) -> int:
    """The rank k (1-based, ascending) of the positive logit that is the largest cut keeping a share >=
    recall of `positives` (> 0) positives: at most k - 1 of them fall below it."""
    return min(int(math.floor(positives * (1 - recall))) + 1, positives)


def decision_threshold(logits: torch.Tensor, y: torch.Tensor, recall: float) -> float:
    """The largest logit cut c with recall(logits >= c) >= `recall` on these labels."""
    positives = logits[y]
    if positives.numel() == 0:
        return float(logits.max()) + 1.0 if logits.numel() else 0.0
    return float(torch.kthvalue(positives.float(), cut_rank(positives.numel(), recall)).values)



def mean_window(masks: list[torch.Tensor]) -> list[float]:
    """Per-K mean of distinct counts over sequences, weighted by the windows each sequence has."""
    sums, counts = [0.0] * len(WINDOW_K), [0] * len(WINDOW_K)
    for m in masks:
        for j, (k, v) in enumerate(zip(WINDOW_K, window_distinct(m))):
            n = m.shape[0] - k + 1
            if n > 0:
                sums[j] += v * n
                counts[j] += n
    return [s / c if c else float("nan") for s, c in zip(sums, counts)]


