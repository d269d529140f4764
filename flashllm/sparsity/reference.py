"""The sparse FFN's meaning, computed from dense weights in DRAM: keep |a| > t_l (oracle) or predicted
AND |a| > t_l (predictor). The budgeted engine must compute exactly this sum from flash."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashllm.models.ffn import active_mask
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


PROMPT_DENSE_NOTE = """A prompt's prefill keeps every neuron; sparsity applies to the tokens generated one at
a time. Measured on SmolLM2-135M, greedy chat answer to "What is the capital of France?" with thresholds
calibrated on prose: dense "The capital of France is Paris."; the prompt sparse too, at 30% and 50%
sparsity: "L'Étoile, la Marseillaise, ..." / "La femme de France, le grand-mère de" (keeping only its
first 1-8 tokens dense did not help). A prefill of T tokens reads the union of their needed neurons,
already nearly all of them at T >= 8, so computing it dense costs almost no extra reads."""


class SparseFFN:
    """The FFN provider in oracle mode (no predictors: keep |a| > t_l) or predictor mode (keep predicted
    AND |a| > t_l), except in a prompt's prefill, which keeps every neuron (PROMPT_DENSE_NOTE). The
    budgeted engine computes the same sum from flash."""

    def __init__(self, model, thresholds: list[float], predictors: Predictors | None = None,
                 counts: SparseCounts | None = None):
        self.model, self.thresholds, self.predictors, self.counts = model, thresholds, predictors, counts
        self.prompt = False

    def begin_pass(self, start: int, tokens: int, prompt: bool) -> None:
        self.prompt = prompt

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        model, counts = self.model, self.counts
        a = model_coefficients(model, layer, x)  # [T, n_ff]
        keep = active_mask(model.spec, a, self.thresholds[layer])  # [T, n_ff] bool
        if self.predictors is not None:
            predicted = self.predictors.predict(layer, x)
            if counts is not None:
                counts.predicted += int(predicted.sum())
                counts.hits += int((predicted & keep).sum())
            keep_true, keep = keep, keep & predicted
        else:
            keep_true = keep
        if self.prompt:
            keep[:] = True
        if counts is not None:
            counts.neurons += keep.numel()
            counts.true += int(keep_true.sum())
        return F.linear(a * keep, model.w(f"layers.{layer}.ffn.down.weight"))  # [T, d]


def sparse_ffn(model, thresholds: list[float], predictors: Predictors | None = None,
               counts: SparseCounts | None = None) -> SparseFFN:
    """The FFN callable for model.with_ffn in oracle or predictor mode (see SparseFFN)."""
    return SparseFFN(model, thresholds, predictors, counts)
