"""Presets as data: every shipped preset is valid, --config sets options, the command line wins."""

import json

import pytest
from typer.testing import CliRunner

from flashllm.cli import app
from flashllm.configs import available, load_config, strategies
from flashllm.engine.flash_model import FlashSettings
from flashllm.errors import FlashLLMError
from tests.test_cli_errors import assert_one_line_error

runner = CliRunner()


def test_every_shipped_preset_is_valid():
    assert {"naive", "hybrid", "page-cache", "all", "int4-gate-up"} <= set(strategies())
    for name, preset in strategies().items():
        assert preset.get("engine", "flash") in ("flash", "mmap"), name
        FlashSettings(**preset.get("flash", {})).check()
    for name in available("models"):
        FlashSettings(**load_config(name, "models").get("flash", {})).check()


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(FlashLLMError, match="smollm2-135m"):
        load_config("no-such-preset")


@pytest.fixture
def bundle(tiny_float_bundle):
    return tiny_float_bundle


def run_json(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stderr.strip().splitlines()[-1])


def test_config_sets_options_and_the_command_line_wins(bundle, tmp_path):
    config = tmp_path / "my.toml"
    config.write_text('[generate]\ndram_budget = "100MB"\nmax_tokens = 3\n\n[flash]\npolicy = "pinned"\ncache = false\n')
    base = ["generate", str(bundle), "hello", "--stats", "json", "--config", str(config)]
    stats = run_json(base)
    assert stats["policy"] == "pinned" and stats["cache_share"] == 0.0 and stats["tokens"] == 2
    assert stats["budget_bytes"] == 100 * 10**6
    stats = run_json(base + ["--policy", "lru", "-n", "5", "--dram-budget", "120MB"])
    assert stats["policy"] == "lru" and stats["tokens"] == 4 and stats["budget_bytes"] == 120 * 10**6


def test_bad_configs_are_one_line_errors(bundle, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[flash]\nwindoww = 3\n")
    assert_one_line_error(runner.invoke(app, ["generate", str(bundle), "hi", "-b", "100MB", "--config", str(bad)]),
                          "windoww")
    bad.write_text("[flash\n")
    assert_one_line_error(runner.invoke(app, ["generate", str(bundle), "hi", "--config", str(bad)]), "TOML")
    assert_one_line_error(runner.invoke(app, ["generate", str(bundle), "hi", "--config", "nope"]), "no such file")
