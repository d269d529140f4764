"""`flashllm bench`: the paper's strategies side by side on the same prompts, under one DRAM budget.

Each strategy runs in its own worker process (so its peak RSS is its own), all workers are started
first, and the prompts are handed out round-robin: prompt 1 to every strategy, then prompt 2, ... so
that the disk's minute-to-minute drift hits all alike. Every worker decodes the same held-out text
teacher-forced (prompt, then one token at a time through the continuation), which gives generation's
real I/O pattern and, from the same logits, perplexity and top-1 agreement with the resident model.

Strategies (docs/DESIGN.md §1; the paper's Tables 2 and 3), each a preset in configs/strategies/:
  resident          all weights in DRAM (no budget): the reference for quality and compute
  naive             every FFN record read from flash for every token
  hybrid            as much of the FFN resident as the budget allows, the rest read every token
  page-cache        what an mmap runtime (llama.cpp) gets: dense over an mmap of the bundle, in a memory
                    cgroup capped at budget + overhead, file dropped from the page cache first
  predictor         predicted neurons read every token, split layout, no cache
  predictor+window  predicted neurons through the neuron cache, split layout
  all               predictor + cache + row-column bundling
  oracle            the true active sets + cache + bundling: the predictor's upper bound
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from flashllm.bundle.reader import Bundle
from flashllm.bundle.writer import convert
from flashllm.configs import strategies as strategy_presets
from flashllm.corpus import load_corpus
from flashllm.errors import FlashLLMError
from flashllm.measure.cgroup import cgroup_unavailable_reason, drop_file_cache, memory_cgroup
from flashllm.paths import home
from flashllm.tokenizer import Tokenizer
from flashllm.units import parse_size

STRATEGIES = tuple(strategy_presets())


def default_strategies(bundle: Path) -> tuple[str, ...]:
    """Every strategy; those that require int4 predictors only where the bundle has them (gated FFN)."""
    settings_path = Path(bundle) / "predictors.json"
    try:
        kind = json.loads(settings_path.read_text()).get("kind", "lowrank") if settings_path.exists() else None
        gated = json.loads((Path(bundle) / "manifest.json").read_text())["ffn"]["gated"]
    except (OSError, ValueError, KeyError):
        kind, gated = None, False
    has_int4 = kind == "int4" and gated
    return tuple(name for name, preset in strategy_presets().items()
                 if preset.get("requires") != "int4-predictors" or has_int4)


@dataclass
class BenchSettings:
    budget: str = "50%"
    prompts: int = 4
    prompt_tokens: int = 128
    tokens: int = 256
    strategies: tuple[str, ...] = STRATEGIES
    window: int = 4
    policy: str = "lru"
    threads: int | None = None
    corpus: str | None = None
    merge_gap_bytes: int | None = None  # None: coalesce by the disk's I/O profile


@dataclass
class StrategyResult:
    name: str
    steps_ms: list[float] = field(default_factory=list)
    io_ms: list[float] = field(default_factory=list)
    memory_ms: list[float] = field(default_factory=list)
    predictor_ms: list[float] = field(default_factory=list)
    bytes_read: int = 0
    kernel_bytes_read: int | None = 0
    needed: int = 0
    hits: int = 0
    peak_rss_bytes: int = 0
    planned_bytes: int = 0
    overhead_bytes: int = 0
    nll: list[float] = field(default_factory=list)
    argmax: list[int] = field(default_factory=list)
    note: str = ""

    def add(self, part: dict) -> None:
        for key in ("steps_ms", "io_ms", "memory_ms", "predictor_ms", "nll", "argmax"):
            getattr(self, key).extend(part[key])
        self.bytes_read += part["bytes_read"]
        if self.kernel_bytes_read is not None and part["kernel_bytes_read"] is not None:
            self.kernel_bytes_read += part["kernel_bytes_read"]
        else:
            self.kernel_bytes_read = None
        self.needed += part["needed"]
        self.hits += part["hits"]
        self.peak_rss_bytes = max(self.peak_rss_bytes, part["peak_rss_bytes"])

    def summary(self, reference: list[int] | None) -> dict:
        steps = len(self.steps_ms)
        med = lambda xs: statistics.median(xs) if xs else 0.0  # noqa: E731
        total = med(self.steps_ms)
        io, memory, predictor = med(self.io_ms), med(self.memory_ms), med(self.predictor_ms)
        agreement = None
        if reference:
            pairs = list(zip(self.argmax, reference))
            agreement = sum(a == b for a, b in pairs) / len(pairs) if pairs else None
        mean_io_s = sum(self.io_ms) / 1000 / steps if steps else 0
        per_token = self.bytes_read / steps if steps else 0
        return {
            "name": self.name,
            "ms_per_token": {"io": io, "memory": memory, "predictor": predictor,
                             "compute": max(total - io - memory - predictor, 0.0), "total": total},
            "ms_per_token_spread": {"p10": _quantile(self.steps_ms, 0.1), "p90": _quantile(self.steps_ms, 0.9)},
            "tokens": steps,
            "bytes_read_per_token": per_token,
            "kernel_bytes_read_per_token": self.kernel_bytes_read / steps if steps and self.kernel_bytes_read
            is not None else None,
            "read_gbps": per_token / mean_io_s / 1e9 if mean_io_s else 0.0,
            "cache_hit_rate": self.hits / self.needed if self.needed else None,
            "peak_rss_bytes": self.peak_rss_bytes,
            "planned_bytes": self.planned_bytes,
            "overhead_bytes": self.overhead_bytes,
            "top1_agreement": agreement,
            "perplexity": math.exp(sum(self.nll) / len(self.nll)) if self.nll else None,
            "note": self.note,
        }


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the parent: prompts, workers, interleaving -----------------------------------------------------

def make_prompts(bundle: Path, settings: BenchSettings) -> list[dict]:
    """Windows of held-out text: prompt_tokens of context, then `tokens` to decode teacher-forced."""
    tokenizer = Tokenizer.from_folder(bundle)
    if tokenizer is None:
        raise FlashLLMError(f"{bundle} has no tokenizer; bench needs one to tokenize its prompts")
    corpus = load_corpus(settings.corpus)
    span = settings.prompt_tokens + settings.tokens
    split = "heldout" if settings.corpus is None else "train"
    ids = corpus.tokens(split, lambda text: tokenizer.encode(text, add_bos=False), span * settings.prompts)
    if len(ids) < span * settings.prompts and split == "heldout":
        ids = corpus.tokens("train", lambda text: tokenizer.encode(text, add_bos=False), span * settings.prompts)
    if len(ids) < span:
        raise FlashLLMError(f"the corpus has {len(ids)} tokens; one prompt needs {span}")
    count = min(settings.prompts, len(ids) // span)
    return [{"prompt": ids[i * span:i * span + settings.prompt_tokens],
             "continuation": ids[i * span + settings.prompt_tokens:(i + 1) * span]} for i in range(count)]


def copies_folder() -> Path:
    """Where bench keeps the split-layout copies it makes (`flashllm bench clean` removes them)."""
    return home() / "bench"


def clean_copies() -> tuple[int, int]:
    """Remove bench's split-layout copies: (folders removed, bytes freed)."""
    folder = copies_folder()
    if not folder.is_dir():
        return 0, 0
    removed = freed = 0
    for copy in sorted(folder.iterdir()):
        freed += sum(p.stat().st_size for p in copy.rglob("*") if p.is_file())
        shutil.rmtree(copy) if copy.is_dir() else copy.unlink()
        removed += 1
    return removed, freed


def split_bundle(bundle: Path, progress=None, log: Callable[[str], None] | None = None) -> Path:
    """The same model in the split (unbundled) layout, made once in the cache folder, with the
    bundle's predictors copied in."""
    manifest = Bundle(bundle).manifest
    if manifest["layout"] == "split":
        return bundle
    key = manifest["resident"]["sha256"][:12]
    out = copies_folder() / f"{bundle.name}-{key}-split"
    if not (out / "manifest.json").exists():
        if log:
            log(f"the split strategies need the split layout: copying the bundle to {out} "
                f"({manifest['sizes']['total_bytes'] / 1e6:,.0f} MB, kept for later runs; "
                f"`flashllm bench clean` removes it)")
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(bundle, out, dtype=manifest["dtype"], layout="split", force=True, progress=progress)
    for name in ("predictors.safetensors", "predictors.json"):
        source = bundle / name
        if source.exists() and (not (out / name).exists() or
                                (out / name).stat().st_mtime < source.stat().st_mtime):
            shutil.copy2(source, out / name)
    return out


class Worker:
    """One strategy in its own process, fed prompts one at a time over stdin/stdout (JSON lines)."""

    def __init__(self, name: str, config: dict, limit_bytes: int | None = None):
        self.name = name
        self.cgroup = None
        cmd = [sys.executable, "-m", "flashllm.measure.bench_worker", json.dumps(config)]
        preexec = None
        if limit_bytes is not None:
            self.cgroup = memory_cgroup(limit_bytes)
            preexec, self.group = self.cgroup.__enter__()
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, preexec_fn=preexec, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.hello = self._receive()

    def _receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            err = self.process.stderr.read().strip().splitlines()
            killed = self.process.poll() in (-9, 137)
            raise WorkerFailed(self.name, ("killed (out of memory?)" if killed else "") + (err[-1] if err else ""))
        message = json.loads(line)
        if "error" in message:
            raise WorkerFailed(self.name, message["error"])
        return message

    def run(self, prompt: dict) -> dict:
        self.process.stdin.write(json.dumps(prompt) + "\n")
        self.process.stdin.flush()
        return self._receive()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        if self.cgroup is not None:
            self.cgroup.__exit__(None, None, None)


class WorkerFailed(Exception):
    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name, self.message = name, message


def run_bench(bundle: Path, settings: BenchSettings, progress: Callable[[int, int, str], None] | None = None,
              log: Callable[[str], None] | None = None) -> dict:
    """Run every strategy over the same prompts; returns {"model", "budget_bytes", "strategies": [...]}."""
    say = log or (lambda message: None)
    presets = strategy_presets()
    unknown = [s for s in settings.strategies if s not in presets]
    if unknown:
        raise FlashLLMError(f"unknown strategy {unknown[0]!r} (choose from {', '.join(STRATEGIES)})")
    b = Bundle(bundle)
    budget = parse_size(settings.budget, of=b.manifest["sizes"]["total_bytes"], what="budget")
    prompts = make_prompts(bundle, settings)
    flash = {s: presets[s] for s in settings.strategies if presets[s].get("engine", "flash") == "flash"}
    needs_predictors = {s for s, preset in flash.items() if preset.get("flash", {}).get("mode") == "predictor"}
    if needs_predictors and not (bundle / "predictors.json").exists():
        raise FlashLLMError(f"{bundle} has no predictors (needed by {', '.join(sorted(needs_predictors))}); "
                            f"run `flashllm train-predictor {bundle}` first")
    split = split_bundle(bundle, log=say) if any(preset.get("layout") == "split" for preset in flash.values()) else None
    max_tokens = settings.prompt_tokens + settings.tokens
    common = {"budget": budget, "max_tokens": max_tokens, "prefill": settings.prompt_tokens,
              "window": settings.window, "policy": settings.policy, "threads": settings.threads,
              "merge_gap_bytes": settings.merge_gap_bytes}
    workers: dict[str, Worker] = {}
    results = {name: StrategyResult(name) for name in ("resident", *settings.strategies)}
    failed: dict[str, str] = {}
    try:
        say("starting workers")
        workers["resident"] = Worker("resident", {"kind": "resident", "bundle": str(bundle), **common})
        for name, preset in flash.items():
            folder = split if preset.get("layout") == "split" else bundle
            fields = dict(preset.get("flash", {}))
            fields["policy"] = fields.get("policy", settings.policy)
            fields.setdefault("gate_up", "flash")  # each strategy is what its preset says, never chosen for it
            try:
                workers[name] = Worker(name, {"kind": "flash", "bundle": str(folder), "settings": fields, **common})
            except WorkerFailed as e:
                failed[name] = e.message
        for name in (s for s in settings.strategies if presets[s].get("engine") == "mmap"):
            overhead = max([w.hello["overhead_bytes"] for w in workers.values()] or [0])
            reason = cgroup_unavailable_reason()
            for path in [bundle / "resident.safetensors", *(bundle / layer["file"] for layer in b.layers)]:
                drop_file_cache(path)
            limit = budget + overhead if reason is None else None
            try:
                workers[name] = Worker("page-cache", {"kind": "mmap", "bundle": str(bundle), **common,
                                                              "simulated": reason is not None}, limit)
                results[name].note = (f"memory cgroup {limit / 1e6:.0f} MB (budget + overhead)" if limit
                                              else f"no cgroup ({reason}): unconstrained, page cache not capped")
            except WorkerFailed as e:
                failed[name] = e.message
        for name, worker in workers.items():
            results[name].planned_bytes = worker.hello.get("planned_bytes", 0)
            results[name].overhead_bytes = worker.hello.get("overhead_bytes", 0)
        total = len(prompts) * len(workers)
        done = 0
        for index, prompt in enumerate(prompts):
            for name, worker in list(workers.items()):  # round-robin: drift hits every strategy alike
                if progress:
                    progress(done, total, f"prompt {index + 1}/{len(prompts)}: {name}")
                try:
                    results[name].add(worker.run(prompt))
                except WorkerFailed as e:
                    failed[name] = e.message
                    worker.close()
                    del workers[name]
                done += 1
        if progress:
            progress(total, total, "done")
    finally:
        for worker in workers.values():
            worker.close()
    reference = results["resident"].argmax
    rows = []
    for name in ("resident", *settings.strategies):
        row = results[name].summary(reference)
        row["engine"] = "resident" if name == "resident" else presets[name].get("engine", "flash")
        if name in failed:
            row["note"] = f"failed: {failed[name]}"
        rows.append(row)
    return {"model": b.manifest["source"]["name"], "bundle": str(bundle), "budget_bytes": budget,
            "model_bytes": b.manifest["sizes"]["total_bytes"], "prompts": len(prompts),
            "prompt_tokens": settings.prompt_tokens, "tokens": settings.tokens, "strategies": rows}


def sweep(bundle: Path, settings: BenchSettings, budgets: list[int], progress=None, log=None) -> list[dict]:
    """ms/token against the budget (the paper's Figure 7): each budget is one bench run."""
    out = []
    for percent in budgets:
        report = run_bench(bundle, replace(settings, budget=f"{percent}%"), progress, log)
        report["budget_percent"] = percent
        out.append(report)
    return out
