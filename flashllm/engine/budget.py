"""The DRAM budget: each part that keeps memory reports its own bytes; the planner only adds them up,
then water-fills what is left into per-layer neuron caches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashllm.engine.cache import NeuronCache
from flashllm.errors import FlashLLMError

# Freed temporaries the C heap keeps between tokens (measured 4-10 MB on SmolLM2): not any part's.
ALLOCATOR_SLACK = 8 * 2**20


@dataclass(frozen=True)
class BudgetPlan:
    budget_bytes: int
    parts: dict[str, int]  # what each fixed holder reported: "resident weights", "KV cache", ...
    capacities: list[int]  # neuron cache rows per layer
    cache_bytes: int  # the caches' rows (their per-neuron index is a fixed part)
    record_bytes: int
    n_ff: int

    @property
    def fixed_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def planned_bytes(self) -> int:
        return self.fixed_bytes + self.cache_bytes

    @property
    def resident_bytes(self) -> int:
        return self.parts["resident weights"]

    @property
    def cache_share(self) -> float:
        """Cache capacity as a share of the whole FFN."""
        return sum(self.capacities) / (self.n_ff * len(self.capacities))

    def lines(self) -> list[str]:
        caps = self.capacities
        return [f"budget {_mb(self.budget_bytes)}: planned {_mb(self.planned_bytes)}",
                "  " + ", ".join(f"{name} {_mb(n)}" for name, n in self.parts.items()),
                f"  neuron caches {_mb(self.cache_bytes)}: {min(caps)}-{max(caps)} of {self.n_ff} neurons per layer "
                f"({100 * self.cache_share:.1f}% of the FFN)"]


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def plan_budget(budget: int, parts: dict[str, int], n_ff: int, n_layers: int, record_bytes: int,
                weights: list[float] | None = None, cache: bool = True) -> BudgetPlan:
    """Fixed parts first (as reported by their holders, plus the caches' per-neuron index and the heap's
    slack); what is left becomes neuron caches, split by each layer's need (`weights`: the paper's
    Req_i, e.g. distinct neurons over the window) and never more than a layer's neurons."""
    index = n_layers * NeuronCache.bytes_for(n_ff, 0, record_bytes)
    parts = {**parts, "cache index": index, "allocator slack": ALLOCATOR_SLACK}
    fixed = sum(parts.values())
    if budget < fixed:
        detail = ", ".join(f"{name} {n / 1e6:,.0f} MB" for name, n in parts.items())
        raise FlashLLMError(f"DRAM budget {budget / 1e6:,.0f} MB is below the minimum {fixed / 1e6:,.0f} MB ({detail})")
    per_row = NeuronCache.bytes_for(n_ff, 1, record_bytes) - NeuronCache.bytes_for(n_ff, 0, record_bytes)
    weights = np.asarray(weights if weights is not None else [1.0] * n_layers, dtype=np.float64)
    weights = np.maximum(weights, 1e-9)
    capacities = np.zeros(n_layers, dtype=np.int64)
    open_layers = np.ones(n_layers, dtype=bool)
    rows_left = (budget - fixed) // per_row if cache else 0
    while rows_left > 0 and open_layers.any():  # water-filling: a full layer's share goes to the others
        share = weights * open_layers / (weights * open_layers).sum()
        grant = np.minimum(np.floor(share * rows_left).astype(np.int64), n_ff - capacities)
        if grant.sum() == 0:
            break
        capacities += grant
        rows_left -= int(grant.sum())
        open_layers &= capacities < n_ff
    return BudgetPlan(budget, parts, capacities.tolist(), int(capacities.sum()) * per_row, record_bytes, n_ff)
