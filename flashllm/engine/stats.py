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
    sparsity_bands: list[dict] = field(default_factory=list)  # see sparsity_bands()
    window: int = 0
    policy: str = ""
    mode: str = ""
    gate_up: str = ""  # "int4": gate/up from the predictors in DRAM, only down read; "flash": every part read
    kernel_cache: bool = False  # the caches keep int4 gate/up in torch's kernel layout (flashllm.models.packed)
    native: bool = False  # quantized records computed from their bytes in C (flashllm.native)
    dots: str = "float32"  # the C kernels' dot products over x: float32 or int8 (FlashSettings.dots)
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


def layer_bands(layers: int) -> list[tuple[int, int]]:
    """The layers split into three contiguous bands, the first, middle and last third, as (first, last)
    layers: band i starts at layer i * L // 3 (L = 30: 0-9, 10-19, 20-29; L = 32: 0-9, 10-20, 21-31).
    A model of fewer than 3 layers has one band per layer."""
    starts = [i * layers // 3 for i in range(4)]
    return [(lo, hi - 1) for lo, hi in zip(starts, starts[1:]) if hi > lo]


def sparsity_bands(needed: list[int], tokens: int, n_ff: int, calibrated: list[float] | None) -> list[dict]:
    """Per band of layers (layer_bands): the sparsity calibration promised, the mean of its layers'
    shares of neurons dropped on the calibration text (None: no promise, dense mode), next to the
    sparsity realized over `tokens` decode tokens, 1 - needed / (tokens * n_ff * layers in the band).
    needed: per layer, the neurons the engine needed (read and computed over) in those tokens."""
    out = []
    for first, last in layer_bands(len(needed)):
        count = last - first + 1
        promise = sum(calibrated[first:last + 1]) / count if calibrated is not None else None
        used = int(sum(needed[first:last + 1]))
        out.append({"layers": [first, last], "calibrated": promise,
                    "realized": 1 - used / (tokens * n_ff * count) if tokens else 0.0})
    return out
