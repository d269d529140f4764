"""`flashllm bench`: the paper's strategies side by side on the same prompts, under one DRAM budget.

Each strategy runs in its own worker process (so its peak RSS is its own), all workers are started
first, and the prompts are handed out round-robin: prompt 1 to every strategy, then prompt 2, ... so
that the disk's minute-to-minute drift hits all alike. Every worker decodes the same held-out text
teacher-forced (prompt, then one token at a time through the continuation), which gives generation's
real I/O pattern and, from the same logits, perplexity and top-1 agreement with the resident model.

Strategies (DESIGN.md §1; the paper's Tables 2 and 3):
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
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from flashllm.errors import FlashLLMError

STRATEGIES = ("naive", "hybrid", "page-cache", "predictor", "predictor+window", "all", "oracle", "int4-gate-up")
FLASH = {  # strategy -> (layout, FlashSettings fields)
    "naive": ("bundled", {"mode": "dense", "cache": False}),
    "hybrid": ("bundled", {"mode": "dense", "policy": "static"}),
    "predictor": ("split", {"mode": "predictor", "cache": False}),
    "predictor+window": ("split", {"mode": "predictor"}),
    "all": ("bundled", {"mode": "predictor"}),
    "oracle": ("bundled", {"mode": "oracle"}),
    # beyond the paper: gate/up from the int4 predictors in DRAM, only down columns read (split layout)
    "int4-gate-up": ("split", {"mode": "predictor", "gate_up": "int4"}),
}


def default_strategies(bundle: Path) -> tuple[str, ...]:
    """Every strategy; int4-gate-up only where the bundle has int4 predictors of a gated FFN."""
    settings_path = Path(bundle) / "predictors.json"
    try:
        kind = json.loads(settings_path.read_text()).get("kind", "lowrank") if settings_path.exists() else None
        gated = json.loads((Path(bundle) / "manifest.json").read_text())["ffn"]["gated"]
    except (OSError, ValueError, KeyError):
        kind, gated = None, False
    return tuple(s for s in STRATEGIES if s != "int4-gate-up" or (kind == "int4" and gated))


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
    from flashllm.corpus import load_corpus
    from flashllm.tokenizer import Tokenizer

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


def split_bundle(bundle: Path, progress=None) -> Path:
    """The same model in the split (unbundled) layout, made once in the cache folder, with the
    bundle's predictors copied in."""
    import shutil

    from flashllm.layout import Bundle, convert
    from flashllm.paths import home

    manifest = Bundle(bundle).manifest
    if manifest["layout"] == "split":
        return bundle
    key = manifest["resident"]["sha256"][:12]
    out = home() / "bench" / f"{bundle.name}-{key}-split"
    if not (out / "manifest.json").exists():
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
        cmd = [sys.executable, "-m", "flashllm.bench", json.dumps(config)]
        preexec = None
        if limit_bytes is not None:
            from flashllm.cgroup import memory_cgroup

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
    from flashllm.cgroup import cgroup_unavailable_reason, drop_file_cache
    from flashllm.layout import Bundle
    from flashllm.sparse import parse_budget

    say = log or (lambda message: None)
    unknown = [s for s in settings.strategies if s not in STRATEGIES]
    if unknown:
        raise FlashLLMError(f"unknown strategy {unknown[0]!r} (choose from {', '.join(STRATEGIES)})")
    b = Bundle(bundle)
    budget = parse_budget(settings.budget, b.manifest["sizes"]["total_bytes"])
    prompts = make_prompts(bundle, settings)
    needs_predictors = {s for s in settings.strategies if s in FLASH and FLASH[s][1]["mode"] == "predictor"}
    if needs_predictors and not (bundle / "predictors.json").exists():
        raise FlashLLMError(f"{bundle} has no predictors (needed by {', '.join(sorted(needs_predictors))}); "
                            f"run `flashllm train-predictor {bundle}` first")
    split = split_bundle(bundle) if any(FLASH.get(s, ("",))[0] == "split" for s in settings.strategies) else None
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
        for name in settings.strategies:
            if name == "page-cache":
                continue
            layout, fields = FLASH[name]
            folder = split if layout == "split" else bundle
            fields = dict(fields, policy=fields.get("policy", settings.policy))
            try:
                workers[name] = Worker(name, {"kind": "flash", "bundle": str(folder), "settings": fields, **common})
            except WorkerFailed as e:
                failed[name] = e.message
        if "page-cache" in settings.strategies:
            overhead = max([w.hello["overhead_bytes"] for w in workers.values()] or [0])
            reason = cgroup_unavailable_reason()
            for path in [bundle / "resident.safetensors", *(bundle / layer["file"] for layer in b.layers)]:
                drop_file_cache(path)
            limit = budget + overhead if reason is None else None
            try:
                workers["page-cache"] = Worker("page-cache", {"kind": "mmap", "bundle": str(bundle), **common,
                                                              "simulated": reason is not None}, limit)
                results["page-cache"].note = (f"memory cgroup {limit / 1e6:.0f} MB (budget + overhead)" if limit
                                              else f"no cgroup ({reason}): unconstrained, page cache not capped")
            except WorkerFailed as e:
                failed["page-cache"] = e.message
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
        if name in failed:
            row["note"] = f"failed: {failed[name]}"
        rows.append(row)
    return {"model": b.manifest["source"]["name"], "bundle": str(bundle), "budget_bytes": budget,
            "model_bytes": b.manifest["sizes"]["total_bytes"], "prompts": len(prompts),
            "prompt_tokens": settings.prompt_tokens, "tokens": settings.tokens, "strategies": rows}


def sweep(bundle: Path, settings: BenchSettings, budgets: list[int], progress=None, log=None) -> list[dict]:
    """ms/token against the budget (the paper's Figure 7): each budget is one bench run."""
    from dataclasses import replace

    out = []
    for percent in budgets:
        report = run_bench(bundle, replace(settings, budget=f"{percent}%"), progress, log)
        report["budget_percent"] = percent
        out.append(report)
    return out


def plot_sweep(runs: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FlashLLMError("--plot needs matplotlib: pip install 'flashllm[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [row["name"] for row in runs[0]["strategies"] if row["name"] != "resident"]
    for name in names:
        xs, ys = [], []
        for run in runs:
            row = next(r for r in run["strategies"] if r["name"] == name)
            if row["tokens"]:
                xs.append(run["budget_percent"])
                ys.append(row["ms_per_token"]["total"])
        ax.plot(xs, ys, marker="o", label=name)
    resident = next(r for r in runs[0]["strategies"] if r["name"] == "resident")
    ax.axhline(resident["ms_per_token"]["total"], color="gray", linestyle="--", label="resident (no budget)")
    ax.set_xlabel("DRAM budget (% of the model)")
    ax.set_ylabel("ms per token (median)")
    ax.set_yscale("log")
    ax.set_title(f"{runs[0]['model']}\ndecode latency against the DRAM budget", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- the worker -------------------------------------------------------------------------------------

def _worker_main(config: dict) -> None:
    """Load one strategy, say hello, then answer one JSON line per prompt."""
    from flashllm.sparse import current_rss, peak_rss

    overhead = current_rss()
    try:
        engine = _build_engine(config)
    except FlashLLMError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return
    overhead = getattr(engine, "overhead_bytes", overhead)  # the engine's own, measured as generate does
    print(json.dumps({"overhead_bytes": overhead, "planned_bytes": engine.planned_bytes}), flush=True)
    for line in sys.stdin:
        prompt = json.loads(line)
        result = engine.score(prompt["prompt"], prompt["continuation"])
        result["peak_rss_bytes"] = peak_rss()
        print(json.dumps(result), flush=True)


class _Engine:
    """Teacher-forced decoding with per-step timings, over any FFN provider."""

    planned_bytes = 0

    def __init__(self, model, ffn=None):
        self.model, self.ffn = model, ffn

    def counters(self) -> dict:
        return {"io": 0.0, "memory": 0.0, "predictor": 0.0, "read": 0, "needed": 0, "hits": 0}

    def score(self, prompt: list[int], continuation: list[int]) -> dict:
        import torch

        from flashllm.flash import kernel_read_bytes

        out = {"steps_ms": [], "io_ms": [], "memory_ms": [], "predictor_ms": [], "nll": [], "argmax": []}
        with torch.inference_mode():
            cache = self.model.new_cache(len(prompt) + len(continuation))
            logits = self.model.forward(torch.tensor(prompt), 0, cache, self.ffn, last_only=True)[0]
            start, kernel0 = self.counters(), kernel_read_bytes()
            for j, token in enumerate(continuation):
                out["nll"].append(float(-torch.log_softmax(logits.float(), -1)[token]))
                out["argmax"].append(int(logits.argmax()))
                if j == len(continuation) - 1:
                    break
                before = self.counters()
                t0 = time.perf_counter()
                logits = self.model.forward(torch.tensor([token]), len(prompt) + j, cache, self.ffn)[0]
                out["steps_ms"].append(1000 * (time.perf_counter() - t0))
                after = self.counters()
                for key in ("io", "memory", "predictor"):
                    out[f"{key}_ms"].append(1000 * (after[key] - before[key]))
            end, kernel1 = self.counters(), kernel_read_bytes()
        out["bytes_read"] = end["read"] - start["read"]
        out["kernel_bytes_read"] = kernel1 - kernel0 if kernel0 is not None and kernel1 is not None else None
        out["needed"], out["hits"] = end["needed"] - start["needed"], end["hits"] - start["hits"]
        return out


class _FlashEngine(_Engine):
    def __init__(self, flash):
        super().__init__(flash.model, flash.ffn)
        self.flash = flash
        self.planned_bytes = flash.plan.planned_bytes
        self.overhead_bytes = flash.overhead_bytes

    def counters(self) -> dict:
        t = self.flash.times
        return {"io": t.io, "memory": t.memory, "predictor": t.predictor,
                "read": self.flash.reader.totals.bytes_read, "needed": self.flash.needed, "hits": self.flash.hit}


class _MmapEngine(_Engine):
    """Dense compute straight over an mmap of the bundle: the page cache decides what is in DRAM."""

    def __init__(self, folder: Path):
        import numpy as np
        import torch

        from flashllm.layout import RESIDENT, Bundle
        from flashllm.models.common import neuron_coefficients
        from flashllm.sources.hf import read_header

        bundle = Bundle(folder)
        header, data_start = read_header(folder / RESIDENT)
        resident = np.memmap(folder / RESIDENT, dtype=np.uint8, mode="r")
        weights = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            lo, hi = entry["data_offsets"]
            raw = torch.from_numpy(resident[data_start + lo:data_start + hi])
            weights[name] = raw.view(bundle.dtype).view(entry["shape"])
        model = bundle.family.model(bundle.config, weights, bundle.dtype)
        parts = []
        for layer in range(bundle.config.num_hidden_layers):
            layer_parts = {}
            for region, region_parts in bundle.regions(layer):
                mapped = np.memmap(region.path, dtype=np.uint8, mode="r", offset=region.offset,
                                   shape=(region.count, region.stride))
                layer_parts |= bundle.split_records(torch.from_numpy(mapped), region_parts)
            parts.append(layer_parts)
        spec = bundle.spec

        def ffn(layer: int, x):
            p = parts[layer]
            bias = p["up_bias"][:, 0] if "up_bias" in p else None
            a = neuron_coefficients(spec, x, p.get("gate"), p["up"], bias)  # [T, n_ff]
            if x.shape[0] == 1:
                return (a.T * p["down"]).sum(0, keepdim=True)
            return (a.float() @ p["down"].float()).to(x.dtype)

        super().__init__(model, ffn)

    def counters(self) -> dict:
        """Page faults are this engine's reads: the kernel's count is its byte count."""
        from flashllm.flash import kernel_read_bytes

        return dict(super().counters(), read=kernel_read_bytes() or 0)


def _build_engine(config: dict) -> _Engine:
    import warnings

    import torch

    warnings.filterwarnings("ignore")  # read-only mmap tensors warn once; nothing writes to them
    folder = Path(config["bundle"])
    if config["kind"] == "resident":
        from flashllm.engine import load_dense
        from flashllm.layout import Bundle

        engine = _Engine(load_dense(folder, Bundle(folder).dtype).model)
        engine.planned_bytes = Bundle(folder).manifest["sizes"]["total_bytes"]
        return engine
    if config["kind"] == "mmap":
        return _MmapEngine(folder)
    from flashllm.sparse import FlashModel, FlashSettings

    fields = dict(config["settings"], window=config["window"], threads=config["threads"],
                  merge_gap_bytes=config["merge_gap_bytes"])
    flash = FlashModel(folder, config["budget"], FlashSettings(**fields), config["max_tokens"], config["prefill"])
    torch.set_grad_enabled(False)
    return _FlashEngine(flash)


if __name__ == "__main__":
    _worker_main(json.loads(sys.argv[1]))
