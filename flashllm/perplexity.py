"""Perplexity of a text under the dense, oracle-sparse or predictor-sparse FFN, and top-1 agreement
with the dense model, the way llama.cpp's llama-perplexity counts: the text is cut into chunks of
`context` tokens, each chunk runs from a fresh cache, and only the second half of each chunk is scored
(every scored token sees at least context/2 tokens before it). With a BOS-adding tokenizer the first
token of every chunk is replaced by BOS, as llama-perplexity does.

`train-predictor` reports its held-out quality through `evaluate`, the same code as the command.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from flashllm.errors import FlashLLMError

MODES = ("dense", "oracle", "predictor")
BUILTIN_PREFIX = "builtin:"
BUILTIN_TOKENS = 8_192  # as train-predictor's held-out evaluation, so the numbers can be compared
CALIBRATION_TOKENS = 8_192

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

    engines: optional {mode: (model, ffn)} replacing the reference sparse FFN for that mode (the budgeted
    engine); otherwise oracle/predictor use predictor.sparse_ffn with `thresholds` on `model`'s weights.
    """
    from flashllm.predictor import SparseCounts, sparse_ffn

    if context < 4:
        raise FlashLLMError(f"--context {context}: must be at least 4")
    chunks = chunks_of(ids, context, bos)
    if not chunks:
        raise FlashLLMError(f"the text has {len(ids)} tokens; --context {context} needs at least {context}")
    modes = [m for m in modes if m != "dense"]
    runs = {"dense": (model, None, None)}
    for mode in modes:
        counts = SparseCounts()
        if engines and mode in engines:
            runs[mode] = (*engines[mode], None)  # the engine keeps its own statistics
        elif mode == "oracle":
            runs[mode] = (model, sparse_ffn(model, thresholds, None, counts), counts)
        elif mode == "predictor":
            if predictors is None:
                raise FlashLLMError("predictor mode needs trained predictors (run `flashllm train-predictor`)")
            runs[mode] = (model, sparse_ffn(model, thresholds, predictors, counts), counts)
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
            for mode, (m, ffn, _) in runs.items():
                t0 = time.perf_counter()
                logits = m.forward(chunk, 0, m.new_cache(context), ffn)[first:-1].float()  # [n, vocab]
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
    for mode, (_, _, counts) in runs.items():
        mean = nll[mode] / scored
        results[mode] = PerplexityResult(mode, context, len(chunks), scored, mean, math.exp(mean),
                                         agree[mode] / scored, kl[mode] / scored, seconds[mode],
                                         counts=counts.to_json() if counts is not None else {})
    return results


def load_text_ids(text: str | Path, tokenizer, max_tokens: int | None = None) -> tuple[list[int], str]:
    """Token ids of a text file, or of the built-in corpus's split (`builtin:heldout`, `builtin:train`)."""
    from flashllm.corpus import builtin_corpus, read_text

    encode = lambda s: tokenizer.encode(s, add_bos=False)  # noqa: E731
    name = str(text)
    if name.startswith(BUILTIN_PREFIX):
        split = name[len(BUILTIN_PREFIX):]
        if split not in ("heldout", "train"):
            raise FlashLLMError(f"{name}: unknown built-in split (use builtin:heldout or builtin:train)")
        corpus = builtin_corpus()
        return corpus.tokens(split, encode, max_tokens or BUILTIN_TOKENS), f"{corpus.description}, {split} split"
    ids = encode(read_text(Path(text)))
    return (ids[:max_tokens] if max_tokens else ids), str(text)


def resolve_thresholds(model, tokenizer, mode: str, sparsity: float | None, predictors, context: int,
                       progress: Progress | None = None) -> tuple[list[float], float | None, list[str]]:
    """Per-layer activation thresholds for a mode: the predictors' own, their calibration table, or a
    fresh calibration on the built-in corpus's training split. Returns (thresholds, sparsity, notes)."""
    from flashllm.predictor import DEFAULT_SPARSITY, calibrate_thresholds

    L, gated = model.config.num_hidden_layers, model.spec.gated
    if mode == "dense":
        if sparsity is not None:
            raise FlashLLMError("--sparsity needs --mode oracle or predictor")
        return [0.0] * L, None, []
    if not gated:
        if sparsity is not None:
            raise FlashLLMError("--sparsity applies to gated FFNs; a ReLU FFN's sparsity is natural (a > 0)")
        return [0.0] * L, None, []
    if mode == "predictor":
        if predictors is None:
            raise FlashLLMError("this model has no predictors; run `flashllm train-predictor` on its bundle first")
        if sparsity is not None and abs(sparsity - predictors.sparsity) > 1e-9:
            raise FlashLLMError(f"the predictors were trained for sparsity {predictors.sparsity:g}, not {sparsity:g}; "
                                f"train again with `flashllm train-predictor --sparsity {sparsity:g}`")
        return predictors.activation_thresholds, predictors.sparsity, []
    if sparsity is None:
        sparsity = predictors.sparsity if predictors is not None else DEFAULT_SPARSITY
    if not 0.0 <= sparsity < 1.0:
        raise FlashLLMError(f"--sparsity {sparsity}: must be in [0, 1)")
    if sparsity == 0:
        return [0.0] * L, 0.0, []
    if predictors is not None and abs(sparsity - predictors.sparsity) < 1e-9:
        return predictors.activation_thresholds, sparsity, []
    key = f"{sparsity:.2f}"
    if predictors is not None and key in predictors.threshold_table and abs(float(key) - sparsity) < 1e-9:
        return predictors.threshold_table[key], sparsity, ["thresholds from the predictors' calibration table"]
    from flashllm.corpus import builtin_corpus

    ids = builtin_corpus().tokens("train", lambda s: tokenizer.encode(s, add_bos=False), CALIBRATION_TOKENS)
    sequences = [torch.tensor(ids[i:i + context]) for i in range(0, len(ids) - context + 1, context)] or \
        [torch.tensor(ids)]
    table = calibrate_thresholds(model, sequences, [sparsity], progress)
    return table[sparsity], sparsity, [f"thresholds calibrated on {len(ids):,} tokens of the built-in corpus"]


def perplexity(model_path: Path, text: str | Path, mode: str = "dense", sparsity: float | None = None,
               dram_budget: str | None = None, context: int = 512, max_tokens: int | None = None,
               recall: float | None = None, dtype: str = "float32", progress: Progress | None = None,
               gate_up: str = "flash") -> dict:
    """`flashllm perplexity`: {"model", "text", "tokens_in_text", "dense": PerplexityResult, mode: ...}."""
    from flashllm.engine import load_dense, parse_dtype
    from flashllm.layout import is_bundle
    from flashllm.predictor import load_predictors

    if mode not in MODES:
        raise FlashLLMError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    if gate_up != "flash" and dram_budget is None:
        raise FlashLLMError("--gate-up applies to the budgeted engine: add --dram-budget")
    model_path = Path(model_path)
    loaded = load_dense(model_path, parse_dtype(dtype))
    if loaded.tokenizer is None:
        raise FlashLLMError(f"{model_path}: has no tokenizer (tokenizer.json or GGUF tokenizer metadata)")
    predictors = load_predictors(model_path) if is_bundle(model_path) else None
    if recall is not None:
        if mode != "predictor":
            raise FlashLLMError("--recall needs --mode predictor")
        if predictors is not None:
            predictors = predictors.with_recall(recall)
    ids, text_name = load_text_ids(text, loaded.tokenizer, max_tokens)
    thresholds, sparsity, notes = resolve_thresholds(loaded.model, loaded.tokenizer, mode, sparsity, predictors,
                                                     context, progress)
    engines, run = None, mode
    if dram_budget is not None:  # measured through the engine, against the dense model in DRAM
        run = "budgeted"
        engines = {run: _budgeted_engine(model_path, mode, dram_budget, thresholds, predictors, context, gate_up)}
        notes.append(f"{mode} mode through the budgeted engine (DRAM budget {dram_budget}, gate/up {gate_up})")
    tok = loaded.tokenizer
    results = evaluate(loaded.model, ids, context, [run], thresholds, predictors,
                       bos=tok.bos_token_id if tok.add_bos else None, engines=engines, progress=progress)
    results[mode] = results.pop(run)
    results[mode].mode = mode
    results[mode].sparsity = sparsity
    if mode == "predictor" and predictors is not None:
        notes.append(f"decision cuts for recall {predictors.settings.get('target_recall')}")
    results[mode].notes = notes
    return {"model": str(model_path), "text": text_name, "tokens_in_text": len(ids), **results}


def _budgeted_engine(folder: Path, mode: str, budget: str, thresholds: list[float], predictors, context: int,
                     gate_up: str = "flash"):
    """(model, ffn) of the budgeted engine for this mode, so that its output is measured, not assumed."""
    from flashllm.layout import is_bundle

    if not is_bundle(folder):
        raise FlashLLMError("--dram-budget needs a bundle folder (make one with `flashllm convert`)")
    try:
        from flashllm.sparse import FlashModel, FlashSettings, parse_budget
    except ImportError:
        raise FlashLLMError("--dram-budget needs the budgeted engine (flashllm.sparse), which this "
                            "installation does not have") from None
    from flashllm.layout import Bundle

    total = Bundle(folder).manifest["sizes"]["total_bytes"]
    flash = FlashModel(folder, parse_budget(budget, total), FlashSettings(mode=mode, gate_up=gate_up), max_tokens=context,
                       prefill_tokens=context)
    flash.thresholds = thresholds
    if predictors is not None and mode == "predictor":
        flash.predictors = predictors  # the decision cuts chosen with --recall
    return flash.model, flash.ffn
