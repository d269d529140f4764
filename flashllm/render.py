"""The rich tables the CLI prints (the paper's per-token breakdowns, bench rows, predictor reports)."""

from __future__ import annotations

import contextlib
import time

from rich.table import Table


def stats_table(s) -> Table:
    """The paper's per-token breakdown (Tables 2 and 3) for one run."""
    ms = s.ms_per_token
    table = Table(title=f"{s.tokens} decode tokens, mode {s.mode}, policy {s.policy}, window {s.window}, "
                        f"cache {100 * s.cache_share:.1f}% of FFN", title_justify="left")
    for column in ("I/O ms", "memory ms", "predictor ms", "compute ms", "total ms", "MB read/token", "tokens/s",
                   "cache hits", "peak RSS / budget + overhead"):
        table.add_column(column, justify="right")
    per_token_mb = s.bytes_read / s.tokens / 1e6 if s.tokens else 0.0
    table.add_row(f"{ms['io']:.1f}", f"{ms['memory']:.1f}", f"{ms['predictor']:.1f}", f"{ms['compute']:.1f}",
                  f"{ms['total']:.1f}", f"{per_token_mb:.1f}", f"{s.tokens_per_s:.2f}", f"{100 * s.cache_hit_rate:.1f}%",
                  f"{s.peak_rss_bytes / 1e6:.0f} / {(s.budget_bytes + s.overhead_bytes) / 1e6:.0f} MB")
    if s.sparsity_bands:  # per band of layers: what the engine skipped, next to what calibration promised
        table.caption = "sparsity by layers: " + ", ".join(
            f"{b['layers'][0]}-{b['layers'][1]} {100 * b['realized']:.1f}%"
            + (f" (calibrated {100 * b['calibrated']:.1f}%)" if b["calibrated"] is not None else "")
            for b in s.sparsity_bands)
        table.caption_justify = "left"
    return table


def bench_table(report: dict) -> Table:
    """Strategies as rows, like the paper's Tables 2 and 3."""
    table = Table(title=f"{report['model']}: budget {report['budget_bytes'] / 1e6:,.0f} MB "
                        f"({100 * report['budget_bytes'] / report['model_bytes']:.0f}% of {report['model_bytes'] / 1e6:,.0f} MB), "
                        f"{report['prompts']} prompts x {report['tokens']} tokens; ms/token are medians",
                  title_justify="left")
    for column in ("strategy", "I/O", "memory", "predictor", "compute", "total ms", "p10-p90", "MB/token", "GB/s",
                   "hits", "peak RSS MB", "top-1", "ppl", "note"):
        table.add_column(column, justify="left" if column in ("strategy", "note") else "right")
    naive = next((r for r in report["strategies"] if r["name"] == "naive" and r["tokens"]), None)
    for r in report["strategies"]:
        ms = r["ms_per_token"]
        fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
        note = r["note"]
        # ratios against naive for the flash engine's rows only: the page cache's bytes are the kernel's
        # misses (near zero when the file fits), which no ratio to our reads describes
        if naive and r["name"] != "naive" and r.get("engine", "flash") == "flash" and r["tokens"] and \
                r["bytes_read_per_token"]:
            note = f"{naive['bytes_read_per_token'] / r['bytes_read_per_token']:.1f}x fewer bytes" + \
                (f", {naive['ms_per_token']['total'] / ms['total']:.1f}x faster" if ms["total"] else "") + \
                " than naive" + (f"; {note}" if note else "")
        table.add_row(r["name"], fmt(ms["io"]), fmt(ms["memory"]), fmt(ms["predictor"]), fmt(ms["compute"]),
                      fmt(ms["total"]), f"{r['ms_per_token_spread']['p10']:.0f}-{r['ms_per_token_spread']['p90']:.0f}",
                      fmt(r["bytes_read_per_token"] / 1e6), fmt(r["read_gbps"], "{:.2f}"),
                      fmt(r["cache_hit_rate"] and 100 * r["cache_hit_rate"], "{:.0f}%"),
                      fmt(r["peak_rss_bytes"] / 1e6, "{:.0f}"), fmt(r["top1_agreement"], "{:.3f}"),
                      fmt(r["perplexity"], "{:.2f}"), note)
    return table


def predictor_table(report: dict) -> Table:
    o = report["overall"]
    table = Table(title=f"predictors: {o['predictor_bytes'] / 1e6:.1f} MB ({o['predictor_percent_of_model']:.1f}% of the "
                  f"model), built in {o['train_seconds']:.0f} s", title_justify="left")
    for column in ("layer", "rank", "sparsity", "true active", "predicted", "recall", "precision", "pinned", "train s"):
        table.add_column(column, justify="right")
    for r in report["layers"]:
        table.add_row(str(r["layer"]), str(r["rank"] or "int4"), f"{r.get('sparsity', 0):.2f}",
                      f"{100 * r['true_active']:.1f}%", f"{100 * r['predicted_active']:.1f}%", f"{r['recall']:.3f}",
                      f"{r['precision']:.3f}", str(r.get("pinned", 0)), f"{r['train_seconds']:.1f}")
    table.add_row("all", "", f"{o.get('sparsity', 1 - o['true_active']):.2f}", f"{100 * o['true_active']:.1f}%",
                  f"{100 * o['predicted_active']:.1f}%", f"{o['recall']:.3f}", f"{o['precision']:.3f}", "",
                  f"{o['train_seconds']:.0f}", style="bold")
    quality = report.get("quality")
    if quality:
        dense = quality["dense"]["perplexity"]
        table.caption = "held-out, every domain: " + ", ".join(
            f"{mode} ppl {q['perplexity']:.3f} ({100 * (q['perplexity'] / dense - 1):+.1f}%, top-1 {q['top1_agreement']:.3f})"
            for mode, q in quality.items() if mode != "domains")
    return table


def selection_table(report: dict) -> Table:
    """Each candidate allocation per held-out domain: perplexity over dense, top-1 agreement, sparsity reached."""
    sel = report.get("selection") or {}
    target = sel.get("max_quality_loss")
    title = (f"sparsity chosen for perplexity within {target:g}% of dense and top-1 >= {sel['min_agreement']:g} on every "
             f"domain: {sel.get('chosen')}" if target is not None else f"sparsity asked: {sel.get('chosen')}")
    table = Table(title=title, title_justify="left")
    table.add_column("candidate")
    table.add_column("mean sparsity", justify="right")
    domains = sel.get("domains", [])
    for d in domains:
        table.add_column(f"{d}: ppl, top-1, sparsity", justify="right")
    table.add_column("within target", justify="right")
    if domains:
        table.add_row("dense", "0.00", *(f"{sel['dense'][d]:.3f}" for d in domains), "")
    for c in sel.get("candidates", []):
        cells = [f"{v['loss_percent']:+.2f}%, {v['top1_agreement']:.3f}, {v['sparsity_reached']:.2f}"
                 for v in (c["domains"][d] for d in domains)]
        passed = "" if c["passed"] is None else ("yes" if c["passed"] else "no")
        table.add_row(c["name"], f"{c['sparsity']:.2f}", *cells, passed,
                      style="bold" if c["name"] == sel.get("chosen") else None)
    return table


def calibration_memory(report: dict) -> str:
    m = report.get("memory") or {}
    if not m:
        return ""
    budget = m.get("budget_bytes")
    limit = f" / budget + overhead {(budget + m['overhead_bytes']) / 1e6:.0f} MB" if budget is not None else ""
    return (f"calibration memory: peak RSS {m['peak_rss_bytes'] / 1e6:.0f} MB{limit} (planned {m['planned_bytes'] / 1e6:.0f} MB, "
            f"overhead {m['overhead_bytes'] / 1e6:.0f} MB)")


def describe(s: dict) -> str:
    return (f"resident {s['resident_bytes'] / 1e6:.1f} MB, FFN {s['ffn_bytes'] / 1e6:.1f} MB "
            f"({100 * s['ffn_bytes'] / s['total_bytes']:.0f}%), {s['record_bytes']} bytes per neuron record, "
            f"padding {s['padding_bytes'] / 1e3:.1f} kB ({s['padding_percent']:.3f}%)")


def weights(summary: dict) -> str:
    """'float16', or for a quantized bundle its kinds: 'auto: gate int4, up int4, down int8; 197 resident int4/int8'."""
    if not summary["part_kinds"] and not summary["resident_kinds"]:
        return summary["dtype"]
    parts = ", ".join(f"{name} {kind}" for name, kind in summary["part_kinds"].items())
    kinds = sorted(set(summary["resident_kinds"].values()))
    return (f"{summary['weights']}: records {parts or summary['dtype']}; {len(summary['resident_kinds'])} resident "
            f"matrices {'/'.join(kinds)}, the rest {summary['dtype']}")


@contextlib.contextmanager
def progress(console, label: str):
    """A rich progress bar on `console` (stderr), handed to library code as a (done, total, what) callback. When stderr
    is not a terminal (a log file, CI, a pipe) a bar cannot redraw: plain lines instead, one per
    PLAIN_PROGRESS_SECONDS (none for a shorter step, so an error stays one line) and the last."""
    if not console.is_terminal:
        last = {"at": time.monotonic(), "said": False}

        def plain(done, total, what):
            now = time.monotonic()
            if now - last["at"] >= PLAIN_PROGRESS_SECONDS or (last["said"] and total and done >= total):
                of = f"{done}/{total}" if total else f"{done}"
                console.file.write(f"{label}: {of} {what}\n")
                console.file.flush()
                last.update(at=now, said=True)

        yield plain
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console, transient=True) as bar:
        task = bar.add_task("", total=None)
        yield lambda done, total, what: bar.update(task, completed=done, total=total, description=what)


PLAIN_PROGRESS_SECONDS = 10
