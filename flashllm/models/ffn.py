"""The FFN per neuron: what a record holds (FFNSpec), each neuron's coefficient, which neurons count as
active, and the one sum over a set of rows that every FFN path (dense, sparse, flash) computes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashllm.models.qrows import QRows, Workspace, combine, project

COMPUTE_ROWS = 1024  # rows per block of the FFN sum: temporaries stay small (Qwen: 3-6 MB)


@dataclass
class FFNSpec:
    """How one layer's FFN is laid out per neuron, so that it can be stored and computed by rows.

    Neuron i of a gated FFN needs gate row i, up row i and down column i; of a ReLU FFN, up row i,
    down column i and up bias i. Each such part is a "row" of `d` values (bias: 1 value).
    """

    gated: bool
    activation: str  # "silu", "gelu_tanh", "gelu", "relu"
    d: int
    n_ff: int
    has_up_bias: bool

    @property
    def parts(self) -> list[tuple[str, int]]:
        """The record's parts in storage order with their widths (in values)."""
        parts = [("gate", self.d)] if self.gated else []
        parts += [("up", self.d), ("down", self.d)]
        if self.has_up_bias:
            parts.append(("up_bias", 1))
        return parts

    @property
    def record_values(self) -> int:
        return sum(width for _, width in self.parts)


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "gelu":
        return F.gelu(x)
    if activation == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {activation}")


def neuron_coefficients(spec: FFNSpec, x: torch.Tensor, gate: torch.Tensor | QRows | None, up: torch.Tensor | QRows,
                        up_bias: torch.Tensor | None, work: Workspace | None = None) -> torch.Tensor:
    """a_i for every neuron whose rows are given: act(g_i.x) * (u_i.x) gated, act(u_i.x + b_i) ReLU
    (quantized rows are expanded into `work` when given)."""
    u = _rows_product(x, up, work)  # [T, n]
    if up_bias is not None:
        u = u + up_bias
    if spec.gated:
        return activate(_rows_product(x, gate, work), spec.activation) * u  # [T, n]
    return activate(u, spec.activation)



def active_mask(spec: FFNSpec, a: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which neurons count as active given their coefficients a: |a| > t (ReLU: a > 0, t = 0)."""
    return a.abs() > threshold if spec.gated else a > 0


def _rows_product(x: torch.Tensor, rows: torch.Tensor | QRows, work: Workspace | None = None) -> torch.Tensor:
    """x [T, d] against n rows [n, d] -> [T, n] (quantized rows expanded a block at a time)."""
    return project(x, rows, work).to(x.dtype) if isinstance(rows, QRows) else x @ rows.T


def ffn_over_rows(a: torch.Tensor, down: torch.Tensor | QRows, dtype: torch.dtype,
                  work: Workspace | None = None) -> torch.Tensor:
    """sum_i a[:, i] * down[i] for rows given as [n, d] (a: [T, n]) -> [T, d] in `dtype`, accumulated in
    float32 a block of COMPUTE_ROWS rows at a time, so no temporary grows with the number of rows."""
    if isinstance(down, QRows):
        return combine(a, down, work).to(dtype)
    T, d = a.shape[0], down.shape[1]
    y = torch.zeros(T, d, dtype=torch.float32)  # [T, d]
    if T == 1:  # one token: a weighted sum of rows is the fast path for half precision
        for start in range(0, down.shape[0], COMPUTE_ROWS):  # (and 3x faster in blocks than at once)
            stop = start + COMPUTE_ROWS
            y += (a[:, start:stop].T * down[start:stop]).sum(0, keepdim=True, dtype=torch.float32)
        return y.to(dtype)
    for start in range(0, down.shape[0], COMPUTE_ROWS):
        stop = start + COMPUTE_ROWS
        y += a[:, start:stop].float() @ down[start:stop].float()
    return y.to(dtype)
