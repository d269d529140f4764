"""Generation: prefill then decode over a preallocated KV cache, greedy or sampled.

Library code yields token ids and fills a stats object; only the CLI prints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from flashllm.errors import FlashLLMError
from flashllm.models import Transformer
from flashllm.models.base import FFNFunction
from flashllm.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SamplingSettings:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stopped_by: str = ""
    step_seconds: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first over the time spent producing them."""
        return (len(self.step_seconds) / self.decode_seconds) if self.decode_seconds > 0 else 0.0


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer | None
    load_seconds: float
    path: Path


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise FlashLLMError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def load_dense(path: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Every weight resident in DRAM, from a checkpoint or a bundle folder."""
    from flashllm.sources import open_source

    start = time.perf_counter()
    source = open_source(path)
    weights = {name: tensor.to(dtype).contiguous() for name, tensor in source.tensors()}
    model = source.family.model(source.config, weights, dtype)
    return LoadedModel(model, source.tokenizer, time.perf_counter() - start, Path(path))


class Sampler:
    def __init__(self, settings: SamplingSettings):
        self.settings = settings
        self.rng = torch.Generator()
        if settings.seed is not None:
            self.rng.manual_seed(settings.seed)
        else:
            self.rng.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [vocab] -> one token id."""
        s = self.settings
        if s.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < s.top_p  # always keeps the top token
            sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
            return int(order[torch.multinomial(sorted_probs, 1, generator=self.rng)])
        return int(torch.multinomial(probs, 1, generator=self.rng))


def generate(model: Transformer, prompt_ids: list[int], settings: SamplingSettings, eos_ids: list[int] = (),
             stats: GenerationStats | None = None, ffn: FFNFunction | None = None,
             max_context: int | None = None) -> Iterator[int]:
    """Yield generated token ids one by one; stats (if given) is filled in as it goes."""
    stats = stats if stats is not None else GenerationStats()
    if not prompt_ids:
        raise FlashLLMError("the prompt is empty")
    limit = max_context or model.config.max_position_embeddings
    total = len(prompt_ids) + settings.max_tokens
    if len(prompt_ids) >= limit:
        raise FlashLLMError(f"the prompt has {len(prompt_ids)} tokens; the context holds {limit}")
    cache = model.new_cache(min(total, limit))
    sample = Sampler(settings)
    stats.prompt_tokens = len(prompt_ids)
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model.forward(torch.tensor(prompt_ids), 0, cache, ffn, last_only=True)[0]
        stats.prefill_seconds = time.perf_counter() - t0
        position = len(prompt_ids)
        for step in range(settings.max_tokens):
            token = sample(logits)
            stats.new_tokens += 1
            yield token
            if settings.stop_at_eos and token in eos_ids:
                stats.stopped_by = "eos"
                return
            if step == settings.max_tokens - 1:
                break
            if position >= cache.max_tokens:
                stats.stopped_by = "context"
                return
            t0 = time.perf_counter()
            logits = model.forward(torch.tensor([token]), position, cache, ffn)[0]
            elapsed = time.perf_counter() - t0
            stats.step_seconds.append(elapsed)
            stats.decode_seconds += elapsed
            position += 1
    stats.stopped_by = "max_tokens"
