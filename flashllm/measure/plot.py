"""The bench sweep as a picture: ms per token against the DRAM budget, one line per strategy."""

from __future__ import annotations

from pathlib import Path

from flashllm.errors import FlashLLMError


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
