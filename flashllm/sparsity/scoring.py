"""train-predictor's second pass: the held-out text of each domain through the dense model and every
candidate allocation side by side, layer by layer (one layer's FFN and predictor in memory at a time),
scored as `flashllm perplexity` scores (sparsity/quality.py), and the choice among the candidates.
See sparsity/calibrate.py for the whole method."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashllm.models.ffn import active_mask
from flashllm.sparsity.calibrate import (SCORE_ROWS, CalibrationStats, Candidate, _drop_head, _embed,
                                         _head_name, _load_head, _model, coefficients, ffn_sum, int4_predictor,
                                         layer_ffn)
from flashllm.sparsity.quality import PerplexityResult

@dataclass
class Score:
    """Sums over one domain's scored positions for one run."""

    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0
    kept: int = 0
    neurons: int = 0
    chunks: int = 0
    context: int = 0
    seconds: float = 0.0

    def result(self, mode: str, sparsity: float | None) -> PerplexityResult:
        n = max(1, self.tokens)
        r = PerplexityResult(mode, self.context, self.chunks, self.tokens, self.nll / n, math.exp(self.nll / n),
                             self.agree / n, self.kl / n, self.seconds, sparsity)
        if self.neurons:
            r.counts = {"kept": self.kept / self.neurons, "sparsity": 1 - self.kept / self.neurons}
        return r

    def __add__(self, other: Score) -> Score:
        return Score(*(getattr(self, f) + getattr(other, f) for f in
                       ("nll", "kl", "agree", "tokens", "kept", "neurons", "chunks")), max(self.context, other.context),
                     self.seconds + other.seconds)


@dataclass
class Quality:
    domains: list[str]
    scores: dict[str, dict[str, Score]]  # run name ("dense" or a candidate's) -> domain -> sums
    stats: CalibrationStats

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.scores["dense"].values())

    def run_of(self, c: Candidate) -> str:
        return "dense" if c.allocation == "dense" else c.name

    def domain_result(self, run: str, domain: str, sparsity: float | None) -> PerplexityResult:
        return self.scores[run][domain].result("dense" if run == "dense" else "predictor", sparsity)

    def loss(self, run: str, domain: str) -> float:
        """Percent perplexity over dense's on a domain."""
        mine, dense = self.scores[run][domain], self.scores["dense"][domain]
        return 100 * (math.exp((mine.nll - dense.nll) / max(1, mine.tokens)) - 1)

    def passes(self, c: Candidate, opts) -> bool:
        run = self.run_of(c)
        return all(self.loss(run, d) <= opts.max_quality_loss and
                   self.scores[run][d].agree / max(1, self.scores[run][d].tokens) >= opts.min_agreement
                   for d in self.domains)

    def summary(self, chosen: Candidate) -> dict:
        """dense and the chosen run over every domain together, as perplexity reports them."""
        total = lambda run: sum((self.scores[run][d] for d in self.domains), Score())  # noqa: E731
        run = self.run_of(chosen)
        out = {"dense": total("dense").result("dense", None).to_json(),
               "predictor": total(run).result("predictor", chosen.mean_level(self.stats)).to_json()}
        out["domains"] = {d: {"dense": self.domain_result("dense", d, None).to_json(),
                              "predictor": self.domain_result(run, d, chosen.mean_level(self.stats)).to_json()}
                          for d in self.domains}
        return out


def evaluation_pass(b, heldout: dict[str, list[torch.Tensor]], cands: list[Candidate], stats: CalibrationStats,
                    opts, group: int | None, progress=None) -> Quality:
    """Pass 2 (see the module's docstring)."""
    spec, L = b.spec, b.config.num_hidden_layers
    key = f"{opts.recall:g}"
    chunks = [(domain, chunk) for domain, cs in heldout.items() for chunk in cs]
    context = max(len(c) for _, c in chunks)
    runs = {"dense": None, **{c.name: c for c in cands if c.allocation != "dense"}}
    model = _model(b)
    model.limit_context(context)
    work = model.workspace
    first = _embed(model, b, [c for _, c in chunks])
    h = {run: [x.clone() for x in first] for run in runs}
    del first
    scores = {run: {d: Score() for d in heldout} for run in runs}
    cache = model.new_cache(context)
    with torch.no_grad():
        for layer in range(L):
            ffn = layer_ffn(b, layer)
            model.weights.update({f"layers.{layer}.{k}": v for k, v in ffn.items()})
            predictor = None
            if len(runs) > 1:
                predictor = int4_predictor(spec, ffn, group)[0] if opts.kind == "int4" else stats.lowrank[layer]
            ls = stats.layers[layer]
            for run, cand in runs.items():
                t0 = time.perf_counter()
                for i, (domain, _) in enumerate(chunks):
                    hi = model.attention(layer, h[run][i], 0, cache)
                    x = model.ffn_input(layer, hi)
                    a = coefficients(spec, x, ffn, work)
                    if cand is not None:
                        j = cand.levels[layer]
                        keep = active_mask(spec, a, ls.thresholds[j]) & (predictor.logits(x) >= ls.cuts[j][key])
                        scores[run][domain].kept += int(keep.sum())
                        scores[run][domain].neurons += keep.numel()
                        a = a * keep
                    h[run][i] = hi + model.ffn_output(layer, ffn_sum(a, ffn, work))
                scores[run][chunks[0][0]].seconds += time.perf_counter() - t0
            del predictor
            for k in list(model.weights):
                if k.startswith(f"layers.{layer}."):
                    del model.weights[k]
            del ffn
            if progress:
                progress(layer + 1, L, f"held-out text, layer {layer}: {len(runs)} runs")
        _load_head(model, b, (_head_name(b),))
        for i, (domain, chunk) in enumerate(chunks):
            half = len(chunk) // 2
            for start in range(half, len(chunk) - 1, SCORE_ROWS):
                stop = min(start + SCORE_ROWS, len(chunk) - 1)
                targets = chunk[start + 1:stop + 1].unsqueeze(1)
                reference = None
                for run in runs:
                    logp = F.log_softmax(model.head(h[run][i][start:stop]).float(), dim=-1)
                    s = scores[run][domain]
                    s.nll -= float(logp.gather(1, targets).sum())
                    if reference is None:
                        reference = logp
                    else:
                        s.kl += float(F.kl_div(logp, reference, log_target=True, reduction="sum"))
                    s.agree += int((logp.argmax(-1) == reference.argmax(-1)).sum())
                    s.tokens += stop - start
            for run in runs:
                scores[run][domain].chunks += 1
                scores[run][domain].context = max(scores[run][domain].context, len(chunk))
        _drop_head(model)
    return Quality(list(heldout), scores, stats)


def choose(cands: list[Candidate], quality: Quality | None, opts) -> Candidate:
    """The asked allocation (--sparsity), or the sparsest candidate within the quality target (else dense)."""
    L = len(cands[0].levels)
    dense = Candidate("dense", "dense", 0.0, [0] * L)
    allowed = [c for c in cands if opts.allocation in ("best", c.allocation) or c.allocation == "dense"]
    worst = lambda c: max(quality.loss(quality.run_of(c), d) for d in quality.domains)  # noqa: E731
    if opts.sparsity is not None or opts.max_quality_loss is None:  # the asked sparsity (best: the better one)
        return min(allowed, key=worst) if quality is not None and len(allowed) > 1 else allowed[0]
    ok = [c for c in allowed if quality is not None and quality.passes(c, opts)]
    return max(ok, key=lambda c: (c.mean_level(quality.stats), -worst(c)), default=dense)


def selection_report(cands: list[Candidate], quality: Quality | None, chosen: Candidate, opts) -> dict:
    out = {"max_quality_loss": opts.max_quality_loss, "min_agreement": opts.min_agreement,
           "allocation": opts.allocation, "chosen": chosen.name, "candidates": []}
    if quality is None:
        return out
    out["domains"] = quality.domains
    out["dense"] = {d: quality.domain_result("dense", d, None).perplexity for d in quality.domains}
    for c in cands:
        run = quality.run_of(c)
        row = {"name": c.name, "allocation": c.allocation, "target": c.target,
               "sparsity": c.mean_level(quality.stats),
               "layer_sparsity": [s.levels[j] for s, j in zip(quality.stats.layers, c.levels)],
               "passed": quality.passes(c, opts) if opts.max_quality_loss is not None else None, "domains": {}}
        for d in quality.domains:
            r = quality.domain_result(run, d, None)
            row["domains"][d] = {"perplexity": r.perplexity, "loss_percent": quality.loss(run, d),
                                 "top1_agreement": r.top1_agreement, "kl_divergence": r.kl_divergence,
                                 "sparsity_reached": r.counts.get("sparsity", 0.0)}
        out["candidates"].append(row)
    return out
