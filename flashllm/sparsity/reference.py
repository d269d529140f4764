"""The sparse FFN's meaning, computed from dense weights in DRAM: keep |a| > t_l (oracle) or predicted
AND |a| > t_l (predictor). The budgeted engine must compute exactly this sum from flash."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashllm.models.ffn import FFNSpec, active_mask
from flashllm.sparsity.predictors import Predictors
from flashllm.sparsity.thresholds import model_coefficients


class SparseCounts:
    """Neuron counts summed over tokens and layers: true active, predicted, and predicted-and-true."""

    def __init__(self):
        self.neurons = self.true = self.predicted = self.hits = 0

    def to_json(self) -> dict:
        n = max(1, self.neurons)
        out = {"true_active": self.true / n}
        if self.predicted:
            out |= {"predicted_active": self.predicted / n, "used": self.hits / n,
                    "recall": self.hits / max(1, self.true), "precision": self.hits / self.predicted}
        return out


def sparse_ffn(model, thresholds: list[float], predictors: Predictors | None = None,
               counts: SparseCounts | None = None):
    """The FFN callable for model.forward in oracle mode (no predictors: keep |a| > t_l) or predictor
    mode (keep predicted AND |a| > t_l). The budgeted engine computes the same sum from flash."""
    spec: FFNSpec = model.spec

    def ffn(layer: int, x: torch.Tensor) -> torch.Tensor:
        a = model_coefficients(model, layer, x)  # [T, n_ff]
        keep = active_mask(spec, a, thresholds[layer])  # [T, n_ff] bool
        if predictors is not None:
            predicted = predictors.predict(layer, x)
            if counts is not None:
                counts.predicted += int(predicted.sum())
                counts.hits += int((predicted & keep).sum())
            keep_true, keep = keep, keep & predicted
        else:
            keep_true = keep
        if counts is not None:
            counts.neurons += keep.numel()
            counts.true += int(keep_true.sum())
        return F.linear(a * keep, model.w(f"layers.{layer}.ffn.down.weight"))  # [T, d]

    return ffn
