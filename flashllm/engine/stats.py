"""The one counter model every verb reports: per-phase times and the FlashStats of `--stats json`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TokenTimes:
    io: float = 0.0
    memory: float = 0.0
    predictor: float = 0.0
    ffn_compute: float = 0.0


@dataclass
class FlashStats:
    """Everything `--stats json` reports; counters cover decode steps unless named otherwise."""

    budget_bytes: int = 0
    planned_bytes: int = 0
    overhead_bytes: int = 0
    peak_rss_bytes: int = 0
    tokens: int = 0
    bytes_read: int = 0
    bytes_useful: int = 0
    requests: int = 0
    kernel_bytes_read: int | None = 0
    neurons_needed: int = 0
    neurons_hit: int = 0
    ms_per_token: dict = field(default_factory=dict)
    tokens_per_s: float = 0.0
    cache_hit_rate: float = 0.0
    sparsity: float = 0.0
    window: int = 0
    policy: str = ""
    mode: str = ""
    gate_up: str = ""  # "int4": gate/up from the predictors in DRAM, only down read; "flash": every part read
    kernel_cache: bool = False  # the caches keep int4 gate/up in torch's kernel layout (flashllm.models.packed)
    cache_share: float = 0.0
    prefill_seconds: float = 0.0
    step_ms: list[float] = field(default_factory=list)

    @property
    def bytes_read_per_token(self) -> float:
        return self.bytes_read / self.tokens if self.tokens else 0

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("step_ms")
        d["bytes_read_per_token"] = self.bytes_read_per_token
        return d
