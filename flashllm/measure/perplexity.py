"""`flashllm perplexity`: a text's perplexity under dense, oracle-sparse or predictor-sparse FFNs,
with the reference semantics in DRAM or measured through the budgeted engine."""

from __future__ import annotations

from pathlib import Path

import torch

from flashllm.bundle.reader import is_bundle
from flashllm.corpus import DOMAINS, builtin_corpus, read_text
from flashllm.engine.flash_model import FlashModel, FlashSettings
from flashllm.engine.generate import load_dense
from flashllm.errors import FlashLLMError
from flashllm.models import parse_dtype
from flashllm.sparsity.predictors import load_predictors
from flashllm.sparsity.quality import MODES, Progress, evaluate
from flashllm.sparsity.thresholds import calibrate_thresholds
from flashllm.sparsity.train import DEFAULT_SPARSITY

BUILTIN_PREFIX = "builtin:"
BUILTIN_TOKENS = 8_192  # as train-predictor's held-out evaluation, so the numbers can be compared
CALIBRATION_TOKENS = 8_192


def load_text_ids(text: str | Path, tokenizer, max_tokens: int | None = None) -> tuple[list[int], str]:
    """Token ids of a text file, or of a split of the built-in corpus: `builtin:heldout`, `builtin:train`
    (the docs domain), or `builtin:DOMAIN:SPLIT` for any of corpus.DOMAINS (chat through the model's
    chat template, where it has one)."""
    encode = lambda s: tokenizer.encode(s, add_bos=False)  # noqa: E731
    name = str(text)
    if name.startswith(BUILTIN_PREFIX):
        fields = name[len(BUILTIN_PREFIX):].split(":")
        domain, split = fields if len(fields) == 2 else ("docs", fields[0])
        if split not in ("heldout", "train") or len(fields) > 2 or domain not in DOMAINS:
            raise FlashLLMError(f"{name}: unknown built-in split (use builtin:heldout, builtin:train or "
                                f"builtin:DOMAIN:SPLIT with a domain of {', '.join(DOMAINS)})")
        corpus = builtin_corpus(domain)
        render = None
        if getattr(tokenizer, "chat_template", None):
            render = lambda messages: tokenizer.render_chat(messages, add_generation_prompt=False)  # noqa: E731
        ids = corpus.tokens(split, encode, max_tokens or BUILTIN_TOKENS, render)
        return ids, f"{corpus.description}, {split} split"
    ids = encode(read_text(Path(text)))
    return (ids[:max_tokens] if max_tokens else ids), str(text)


def resolve_thresholds(model, tokenizer, mode: str, sparsity: float | None, predictors, context: int,
                       progress: Progress | None = None) -> tuple[list[float], float | None, list[str]]:
    """Per-layer activation thresholds for a mode: the predictors' own, their calibration table, or a
    fresh calibration on the built-in corpus's training split. Returns (thresholds, sparsity, notes)."""
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
    ids = builtin_corpus().tokens("train", lambda s: tokenizer.encode(s, add_bos=False), CALIBRATION_TOKENS)
    sequences = [torch.tensor(ids[i:i + context]) for i in range(0, len(ids) - context + 1, context)] or \
        [torch.tensor(ids)]
    table = calibrate_thresholds(model, sequences, [sparsity], progress)
    return table[sparsity], sparsity, [f"thresholds calibrated on {len(ids):,} tokens of the built-in corpus"]


def perplexity(model_path: Path, text: str | Path, mode: str = "dense", sparsity: float | None = None,
               dram_budget: str | None = None, context: int = 512, max_tokens: int | None = None,
               recall: float | None = None, dtype: str = "float32", progress: Progress | None = None,
               gate_up: str = "auto", dots: str = "float32") -> dict:
    """`flashllm perplexity`: {"model", "text", "tokens_in_text", "dense": PerplexityResult, mode: ...}."""
    if mode not in MODES:
        raise FlashLLMError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    if dram_budget is None:
        FlashSettings(gate_up=gate_up, dots=dots).check_without_budget()
    FlashSettings(dots=dots).check()
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
        engines = {run: _budgeted_engine(model_path, mode, dram_budget, thresholds, recall, context, gate_up, dots)}
        notes.append(f"{mode} mode through the budgeted engine (DRAM budget {dram_budget}, gate/up {gate_up}, "
                     f"{dots} dot products)")
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


def _budgeted_engine(folder: Path, mode: str, budget: str, thresholds: list[float], recall: float | None,
                     context: int, gate_up: str = "auto", dots: str = "float32"):
    """The budgeted engine's model for this mode, so that its output is measured, not assumed."""
    if not is_bundle(folder):
        raise FlashLLMError("--dram-budget needs a bundle folder (make one with `flashllm convert`)")
    settings = FlashSettings(mode=mode, gate_up=gate_up, recall=recall if mode == "predictor" else None, dots=dots)
    return FlashModel.open(folder, budget, settings, max_tokens=context, prefill_tokens=context,
                           thresholds=thresholds, pass_tokens=context).model  # windows forwarded whole
