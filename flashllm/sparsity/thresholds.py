"""Activation thresholds: the per-layer |a| cut that reaches a target sparsity on text (CATS, TEAL), and
the activation statistics train-predictor stores (distinct neurons over a window of tokens)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from flashllm.models.ffn import FFNSpec, neuron_coefficients

THRESHOLD_GRID = [round(0.05 * i, 2) for i in range(1, 20)]  # sparsities 0.05 .. 0.95
THRESHOLD_SAMPLE = 1 << 22  # |a| values per layer kept for the quantiles
WINDOW_K = list(range(1, 9))

Progress = Callable[[int, int, str], None]


def window_distinct(mask: torch.Tensor, ks: list[int] = WINDOW_K) -> list[float]:
    """Mean number of distinct neurons active in the last K tokens, for each K (the paper's Req_i).
    mask: [T, n_ff] bool of one sequence in token order."""
    out, union = [], mask.clone()
    for k in range(1, max(ks) + 1):
        if k > 1:
            union = union[:-1] | mask[k - 1:]  # windows of k tokens ending at positions k-1 ..
        if k in ks:
            out.append(float(union.sum(1).float().mean()) if union.shape[0] else float("nan"))
    return out


def sparsity_threshold(sample: torch.Tensor, sparsity: float) -> float:
    """The |a| below which a share `sparsity` of the coefficients falls (sample sorted ascending)."""
    if sparsity <= 0:
        return 0.0
    return float(sample[min(int(sparsity * sample.numel()), sample.numel() - 1)])


def abs_sample(a: torch.Tensor, limit: int, g: torch.Generator) -> torch.Tensor:
    flat = a.abs().flatten()
    if flat.numel() > limit:
        flat = flat[torch.randint(flat.numel(), (limit,), generator=g)]
    return flat



def calibrate_thresholds(model, sequences: list[torch.Tensor], sparsities: list[float],
                         progress: Progress | None = None) -> dict[float, list[float]]:
    """Per-layer thresholds t_l reaching each sparsity on these token sequences (dense forward)."""
    spec: FFNSpec = model.spec
    L = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    budget = max(1, THRESHOLD_SAMPLE // max(1, len(sequences)))
    samples: list[list[torch.Tensor]] = [[] for _ in range(L)]

    def record(layer: int, x: torch.Tensor) -> torch.Tensor:
        a = model_coefficients(model, layer, x)
        samples[layer].append(abs_sample(a.float(), budget, g))
        return F.linear(a, model.w(f"layers.{layer}.ffn.down.weight"))

    with torch.inference_mode():
        for i, ids in enumerate(sequences):
            model.with_ffn(record).forward(ids, 0, model.new_cache(len(ids)))
            if progress:
                progress(i + 1, len(sequences), "calibrating thresholds")
    table = {}
    sorted_samples = [torch.sort(torch.cat(s)).values for s in samples]
    for s in sparsities:
        table[s] = [0.0] * L if not spec.gated else [sparsity_threshold(v, s) for v in sorted_samples]
    return table


def model_coefficients(model, layer: int, x: torch.Tensor) -> torch.Tensor:
    p = f"layers.{layer}."
    return neuron_coefficients(model.spec, x, model.w(p + "ffn.gate.weight"), model.w(p + "ffn.up.weight"),
                               model.w(p + "ffn.up.bias"))  # [T, n_ff]
