"""The decode loop every verb uses: prefill then decode over a preallocated KV cache, greedy or sampled;
and its teacher-forced variant (`score`) for bench. The model's FFN and embedding providers decide
where weights come from (resident or flash); this loop does not know.

Library code yields token ids and fills a stats object; only the CLI prints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from flashllm.bundle.reader import open_model
from flashllm.errors import FlashLLMError
from flashllm.models import Transformer
from flashllm.tokenizer import Tokenizer


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


def load_dense(path: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Every weight resident in DRAM, from a checkpoint or a bundle folder."""
    start = time.perf_counter()
    source = open_model(path)
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
             stats: GenerationStats | None = None, max_context: int | None = None) -> Iterator[int]:
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
        logits = model.forward(torch.tensor(prompt_ids), 0, cache, last_only=True)[0]
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
            logits = model.forward(torch.tensor([token]), position, cache)[0]
            elapsed = time.perf_counter() - t0
            stats.step_seconds.append(elapsed)
            stats.decode_seconds += elapsed
            position += 1
    stats.stopped_by = "max_tokens"


@dataclass
class ScoreResult:
    """Teacher-forced decoding of a continuation: per step the NLL of the true token, the argmax, and
    the step's seconds (the prefill of the prompt is not a step)."""

    nll: list[float] = field(default_factory=list)
    argmax: list[int] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)


def score(model: Transformer, prompt: list[int], continuation: list[int],
          on_step: Callable[[], None] | None = None) -> ScoreResult:
    """Decode `continuation` one token at a time after `prompt`, feeding the true tokens (not the
    model's). `on_step` is called after the prefill and after every decode step, so a caller can read
    its counters between steps (bench does)."""
    out = ScoreResult()
    with torch.inference_mode():
        cache = model.new_cache(len(prompt) + len(continuation))
        logits = model.forward(torch.tensor(prompt), 0, cache, last_only=True)[0]
        if on_step is not None:
            on_step()
        for j, token in enumerate(continuation):
            out.nll.append(float(-torch.log_softmax(logits.float(), -1)[token]))
            out.argmax.append(int(logits.argmax()))
            if j == len(continuation) - 1:
                break
            t0 = time.perf_counter()
            logits = model.forward(torch.tensor([token]), len(prompt) + j, cache)[0]
            out.step_seconds.append(time.perf_counter() - t0)
            if on_step is not None:
                on_step()
    return out
