"""Quality of a sparse FFN against dense: perplexity, top-1 agreement and KL, the way llama.cpp's
llama-perplexity counts: the text is cut into chunks of `context` tokens, each chunk runs from a fresh
cache, and only the second half of each chunk is scored (every scored token sees at least context/2
tokens before it). With a BOS-adding tokenizer the first token of every chunk is replaced by BOS.

`train-predictor` reports its held-out quality and `flashllm perplexity` its numbers through `evaluate`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from flashllm.errors import FlashLLMError
from flashllm.sparsity.reference import SparseCounts, sparse_ffn

MODES = ("dense", "oracle", "predictor")

Progress = Callable[[int, int, str], None]


@dataclass
class PerplexityResult:
    mode: str
    context: int
    chunks: int
    tokens: int  # tokens scored
    nll: float  # mean negative log-likelihood per scored token (nats)
    perplexity: float
    top1_agreement: float  # share of scored positions where the argmax equals the dense model's
    kl_divergence: float  # mean KL(dense || this mode) in nats
    seconds: float
    sparsity: float | None = None
    counts: dict = field(default_factory=dict)  # true/predicted active shares, recall, precision
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def chunks_of(ids: list[int], context: int, bos: int | None = None) -> list[torch.Tensor]:
    """Whole chunks of `context` tokens (a partial tail is dropped, as llama-perplexity does)."""
    out = []
    for start in range(0, len(ids) - context + 1, context):
        chunk = torch.tensor(ids[start:start + context])
        if bos is not None:
            chunk[0] = bos
        out.append(chunk)
    return out


def evaluate(model, ids: list[int], context: int, modes: list[str], thresholds: list[float] | None = None,
             predictors=None, bos: int | None = None, engines: dict | None = None,
             progress: Progress | None = None) -> dict[str, PerplexityResult]:
    """Perplexity of `ids` for dense and each of `modes`, chunk by chunk, side by side with dense.

    engines: optional {mode: model} whose providers replace the reference sparse FFN for that mode (the
    budgeted engine); otherwise oracle/predictor use sparse_ffn with `thresholds` on `model`'s weights.
    """
    if context < 4:
        raise FlashLLMError(f"--context {context}: must be at least 4")
    chunks = chunks_of(ids, context, bos)
    if not chunks:
        raise FlashLLMError(f"the text has {len(ids)} tokens; --context {context} needs at least {context}")
    modes = [m for m in modes if m != "dense"]
    runs = {"dense": (model, None)}
    for mode in modes:
        counts = SparseCounts()
        if engines and mode in engines:
            runs[mode] = (engines[mode], None)  # the engine keeps its own statistics
        elif mode == "oracle":
            runs[mode] = (model.with_ffn(sparse_ffn(model, thresholds, None, counts)), counts)
        elif mode == "predictor":
            if predictors is None:
                raise FlashLLMError("predictor mode needs trained predictors (run `flashllm train-predictor`)")
            runs[mode] = (model.with_ffn(sparse_ffn(model, thresholds, predictors, counts)), counts)
        else:
            raise FlashLLMError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    first = context // 2
    nll = {m: 0.0 for m in runs}
    kl = {m: 0.0 for m in runs}
    agree = {m: 0 for m in runs}
    seconds = {m: 0.0 for m in runs}
    scored = 0
    with torch.inference_mode():
        for c, chunk in enumerate(chunks):
            targets = chunk[first + 1:]  # [n]
            reference = None
            for mode, (m, _) in runs.items():
                t0 = time.perf_counter()
                logits = m.forward(chunk, 0, m.new_cache(context))[first:-1].float()  # [n, vocab]
                seconds[mode] += time.perf_counter() - t0
                logp = F.log_softmax(logits, dim=-1)
                nll[mode] -= float(logp.gather(1, targets.unsqueeze(1)).sum())
                if reference is None:
                    reference = logp
                else:
                    kl[mode] += float(F.kl_div(logp, reference, log_target=True, reduction="sum"))
                agree[mode] += int((logp.argmax(-1) == reference.argmax(-1)).sum())
            scored += len(targets)
            if progress:
                progress(c + 1, len(chunks), f"perplexity chunk {c + 1}/{len(chunks)}")
    results = {}
    for mode, (_, counts) in runs.items():
        mean = nll[mode] / scored
        results[mode] = PerplexityResult(mode, context, len(chunks), scored, mean, math.exp(mean),
                                         agree[mode] / scored, kl[mode] / scored, seconds[mode],
                                         counts=counts.to_json() if counts is not None else {})
    return results
