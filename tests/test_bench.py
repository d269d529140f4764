"""bench in quick mode on a tiny model: the report's structure and the byte ordering of strategies."""

import json

import pytest
from typer.testing import CliRunner

from flashllm.bundle.writer import convert
from flashllm.cli import app
from flashllm.engine.flash_model import FlashModel, FlashSettings
from flashllm.measure.bench import (
    STRATEGIES,
    BenchSettings,
    default_strategies,
    run_bench,
)
from flashllm.sparsity.train import train_predictors
from tests.tiny import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    # d = 128 in float32: every record part is a multiple of 512 bytes, so the split layout pays no
    # alignment overhead and the byte counts compare the strategies, not the padding
    source = tiny_llama(root / "src", vocab_size=300, hidden_size=128, intermediate_size=512, num_hidden_layers=3)
    tiny_tokenizer(source, 300)
    out = root / "bundle"
    convert(source, out, dtype="float32")
    train_predictors(out, tokens=2048, eval_tokens=0, context=128, recall=0.8, sparsity=0.5)  # int4 gate/up, the default
    return out


def budget_for(bundle, cache_share: float) -> int:
    """A budget whose neuron caches hold about cache_share of the FFN."""
    flash = FlashModel(bundle, 10**10, FlashSettings(mode="predictor"), 48, 16)  # the largest fixed part
    rows = flash.bundle.config.num_hidden_layers * flash.spec.n_ff * cache_share
    return flash.plan.fixed_bytes + int(rows * (flash.plan.record_bytes + 16))


def test_quick_bench_report_and_byte_order(bundle, tmp_path):
    # no gaps read through: on records this small the I/O profile would read whole regions, hiding the
    # byte savings this test is about
    settings = BenchSettings(budget=str(budget_for(bundle, 0.15)), prompts=1, prompt_tokens=16, tokens=16,
                             merge_gap_bytes=0)
    report = run_bench(bundle, settings)
    assert report["budget_bytes"] > 0 and report["prompts"] == 1
    rows = {r["name"]: r for r in report["strategies"]}
    assert set(rows) == {"resident", *STRATEGIES}
    for name, row in rows.items():
        assert row["tokens"] == 15, (name, row["note"])
        assert row["ms_per_token"]["total"] > 0
        reads_flash = name not in ("resident", "page-cache")
        assert (row["ms_per_token"]["io"] > 0) == reads_flash, name  # the resident model does no I/O
        for key in ("bytes_read_per_token", "read_gbps", "cache_hit_rate", "peak_rss_bytes", "top1_agreement",
                    "perplexity"):
            assert key in row
    read = {name: row["bytes_read_per_token"] for name, row in rows.items()}
    assert read["naive"] > read["hybrid"] > read["predictor"] > read["predictor+window"]
    # down columns only, a third of a record, and a cache that holds three times the neurons
    assert read["int4-gate-up"] < read["predictor+window"] / 2
    assert default_strategies(bundle) == STRATEGIES  # int4 predictors on a gated FFN: all of them
    assert rows["oracle"]["top1_agreement"] == 1.0 or rows["oracle"]["top1_agreement"] > 0.9
    assert rows["naive"]["top1_agreement"] == 1.0  # every neuron read from flash: the resident model's argmax
    assert rows["naive"]["perplexity"] == pytest.approx(rows["resident"]["perplexity"], rel=1e-3)


def test_cli_bench_quick_json(bundle, tmp_path):
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["bench", str(bundle), "--quick", "--strategies", "naive,all",
                                      "--dram-budget", str(budget_for(bundle, 0.3)), "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["strategies"]] == ["resident", "naive", "all"]
    assert "naive" in result.stderr


def test_bench_unknown_strategy(bundle):
    result = CliRunner().invoke(app, ["bench", str(bundle), "--quick", "--strategies", "magic"])
    assert result.exit_code == 1 and "unknown strategy" in result.stderr


def test_failed_strategies_exit_nonzero_and_bench_clean_removes_the_copies(bundle, tmp_path):
    from flashllm.measure.bench import copies_folder

    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["bench", str(bundle), "--quick", "--strategies", "naive,predictor",
                                      "--dram-budget", "1MB", "--json", str(out)])
    assert result.exit_code == 1, result.output
    assert "2 strategies failed: naive, predictor" in result.stderr
    rows = {r["name"]: r for r in json.loads(out.read_text())["strategies"]}  # the report is still written
    assert rows["naive"]["note"].startswith("failed:") and rows["resident"]["tokens"] > 0
    assert "copying the bundle to" in result.stderr  # the split copy is announced, with its size
    assert len(list(copies_folder().iterdir())) == 1
    result = CliRunner().invoke(app, ["bench", "clean"])
    assert result.exit_code == 0 and "removed 1 split-layout copy" in result.stdout
    assert not any(copies_folder().iterdir())


def test_page_cache_row_has_no_ratio_to_naive():
    from flashllm import render

    row = lambda name, engine, read: {"name": name, "engine": engine, "tokens": 4, "bytes_read_per_token": read,
                                      "ms_per_token": {k: 1.0 for k in ("io", "memory", "predictor", "compute", "total")},
                                      "ms_per_token_spread": {"p10": 1, "p90": 1}, "read_gbps": 0.0,
                                      "cache_hit_rate": None, "peak_rss_bytes": 1, "top1_agreement": 1.0,
                                      "perplexity": 2.0, "note": ""}
    report = {"model": "m", "budget_bytes": 10, "model_bytes": 20, "prompts": 1, "tokens": 4,
              "strategies": [row("naive", "flash", 1e6), row("page-cache", "mmap", 7.0), row("hybrid", "flash", 5e5)]}
    from rich.console import Console

    console = Console(record=True, width=300)
    console.print(render.bench_table(report))
    text = console.export_text()
    assert "2.0x fewer bytes" in text and "142857" not in text
