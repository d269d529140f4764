"""The realized sparsity per band of layers (`--stats json` sparsity_bands), next to what calibration
promised: counted by the engine, checked against the reference sparse FFN's own count."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from flashllm.bundle.writer import convert
from flashllm.cli import app
from flashllm.engine.flash_model import FlashModel, FlashSettings
from flashllm.engine.generate import SamplingSettings, generate, load_dense
from flashllm.engine.stats import FlashStats, layer_bands
from flashllm.errors import FlashLLMError
from flashllm.models.ffn import neuron_coefficients
from flashllm.sparsity.predictors import Int4Predictor, Predictors, load_predictors
from flashllm.sparsity.reference import sparse_ffn
from tests.test_cli_errors import assert_one_line_error
from tests.tiny import tiny_llama, tiny_tokenizer

L = 5  # bands 0-0, 1-2, 3-4: uneven, so a band's layer count matters
BANDS = [[0, 0], [1, 2], [3, 4]]
IDS = [5, 17, 3, 88, 41, 2, 60, 60, 9, 33]
BIG = 10**10
CUT_SCALE = [0.5, 0.8, 1.0, 1.3, 1.7]  # decision cut / activation threshold: each layer predicts a different share
runner = CliRunner()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A tiny gated model of 5 layers with a tokenizer, as a float32 bundle without predictors."""
    root = tmp_path_factory.mktemp("bands")
    source = tiny_llama(root / "src", vocab_size=300, num_hidden_layers=L)
    tiny_tokenizer(source, 300)
    convert(source, root / "bundle", dtype="float32")
    return root / "bundle"


def with_predictors(plain, folder, **extra):
    """A copy of the bundle with int4 predictors built here (no training): activation thresholds at the
    median |a| of IDS per layer, decision cuts a different multiple of them per layer; `extra` goes into
    predictors.json as it is."""
    shutil.copytree(plain, folder)
    dense = load_dense(plain).model
    medians = {}

    def record(layer, x):
        w = lambda name: dense.weights.get(f"layers.{layer}." + name)  # noqa: E731
        values = neuron_coefficients(dense.spec, x, w("ffn.gate.weight"), w("ffn.up.weight"), None).abs().flatten().sort().values
        middle = len(values) // 2
        medians[layer] = float(values[middle - 1] + values[middle]) / 2
        return dense.ffn_dense(layer, x)

    dense.with_ffn(record).forward(torch.tensor(IDS), 0, dense.new_cache(len(IDS)))
    thresholds = [medians[layer] for layer in range(L)]
    layers = [Int4Predictor.from_ffn(dense.spec, {k.split(".", 2)[2]: v for k, v in dense.weights.items()
                                                  if k.startswith(f"layers.{layer}.ffn.") and "down" not in k})
              for layer in range(L)]
    settings = {"sparsity": 0.5, "activation_thresholds": thresholds, "kind": "int4", "n_ff": dense.spec.n_ff,
                "int4_rows": layers[0].matrix.rows, "int4_group": layers[0].matrix.group,
                "int4_activation": layers[0].activation, "ranks": [0] * L,
                "decision_thresholds": [t * s for t, s in zip(thresholds, CUT_SCALE)], **extra}
    Predictors(layers, settings).save(folder)
    return folder


@pytest.fixture(scope="module")
def predicted(plain, tmp_path_factory):
    return with_predictors(plain, tmp_path_factory.mktemp("predicted") / "bundle")


def test_layer_bands_are_three_contiguous_thirds():
    assert layer_bands(30) == [(0, 9), (10, 19), (20, 29)]
    assert layer_bands(32) == [(0, 9), (10, 20), (21, 31)]
    assert layer_bands(L) == [tuple(b) for b in BANDS]
    assert layer_bands(2) == [(0, 0), (1, 1)] and layer_bands(1) == [(0, 0)]


class CountingFFN:
    """The reference sparse FFN (predicted AND |a| > t), counting per layer the neurons the predictors
    chose on each generated token (a prompt's prefill keeps every neuron and is not counted)."""

    def __init__(self, dense, thresholds, predictors):
        self.ffn, self.predictors = sparse_ffn(dense, thresholds, predictors), predictors
        self.needed, self.prompt = [0] * L, False

    def begin_pass(self, start, tokens, prompt):
        self.prompt = prompt
        self.ffn.begin_pass(start, tokens, prompt)

    def __call__(self, layer, x):
        if not self.prompt:
            self.needed[layer] += int(self.predictors.predict(layer, x).sum())
        return self.ffn(layer, x)


@pytest.mark.parametrize("cached", [True, False])
def test_realized_sparsity_per_band_equals_the_reference_count(predicted, cached):
    """Greedy generation: the engine's realized sparsity per band is the reference's count of predicted
    neurons per generated token, whether the neurons come from the cache or stream past it."""
    sampling = SamplingSettings(max_tokens=8, stop_at_eos=False)
    flash = FlashModel(predicted, BIG, FlashSettings(mode="predictor", cache=cached), 32, 16)
    assert flash.mode == "predictor" and flash.gate_up == "flash"
    stats = FlashStats()
    tokens = list(flash.generate(IDS, sampling, stats=stats))
    dense = load_dense(predicted).model
    counting = CountingFFN(dense, flash.thresholds, load_predictors(predicted))
    assert tokens == list(generate(dense.with_ffn(counting), IDS, sampling))  # the same path was taken
    steps, n_ff = stats.tokens, flash.spec.n_ff
    assert steps == 7
    expected = [1 - sum(counting.needed[a:b + 1]) / (steps * n_ff * (b - a + 1)) for a, b in BANDS]
    assert [band["layers"] for band in stats.sparsity_bands] == BANDS
    assert [band["realized"] for band in stats.sparsity_bands] == pytest.approx(expected, abs=1e-12)
    assert len({round(r, 6) for r in expected}) == 3 and all(0 < r < 1 for r in expected)  # a real check
    assert [band["calibrated"] for band in stats.sparsity_bands] == [0.5] * 3
    assert stats.sparsity == pytest.approx(1 - sum(counting.needed) / (steps * n_ff * L))


def test_dense_mode_has_no_promise(predicted, plain):
    """Dense on request, for want of predictors, and with predictors that do not fit the budget."""
    floor = FlashModel(predicted, BIG, FlashSettings(mode="dense"), 32, 16).plan.fixed_bytes
    predictor_bytes = FlashModel(predicted, BIG, FlashSettings(), 32, 16).plan.parts["predictors"]
    for folder, mode, budget in ((predicted, "dense", BIG), (plain, "predictor", BIG),
                                 (predicted, "predictor", floor + predictor_bytes // 2)):
        flash = FlashModel(folder, budget, FlashSettings(mode=mode), 32, 16)
        assert flash.mode == "dense"
        stats = FlashStats()
        list(flash.generate(IDS, SamplingSettings(max_tokens=4, stop_at_eos=False), stats=stats))
        assert stats.tokens == 3
        assert stats.to_json()["sparsity_bands"] == [{"layers": b, "calibrated": None, "realized": 0.0} for b in BANDS]


def stats_json(folder, *options) -> dict:
    result = runner.invoke(app, ["generate", str(folder), "the", "-n", "4", "--dram-budget", "1GB",
                                 "--stats", "json", *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.stderr.strip().splitlines()[-1])


def test_layer_sparsity_promises_per_band(plain, predicted, tmp_path):
    """With "layer_sparsity" in predictors.json each band's promise is the mean of its layers'; without
    it, the one "sparsity" for every band; shown in the stats table too."""
    per_layer = [0.1, 0.2, 0.4, 0.6, 0.9]
    folder = with_predictors(plain, tmp_path / "per-layer", layer_sparsity=per_layer)
    bands = stats_json(folder)["sparsity_bands"]
    assert [b["layers"] for b in bands] == BANDS
    assert [b["calibrated"] for b in bands] == pytest.approx([0.1, 0.3, 0.75])
    assert all(isinstance(b["realized"], float) for b in bands)
    assert [b["calibrated"] for b in stats_json(predicted)["sparsity_bands"]] == [0.5] * 3
    assert [b["calibrated"] for b in stats_json(folder, "--mode", "dense")["sparsity_bands"]] == [None] * 3
    table = runner.invoke(app, ["generate", str(folder), "the", "-n", "4", "--dram-budget", "1GB"])
    assert table.exit_code == 0, table.output
    assert "calibrated 75.0%" in " ".join(table.stderr.split())


@pytest.mark.parametrize("value,message", [([0.5] * (L - 1), "layer_sparsity has 4 entries, must have 5"),
                                           ([0.5] * (L - 1) + [1.5], "layer_sparsity[4] is 1.5, must be <= 1")])
def test_a_wrong_layer_sparsity_is_refused(plain, tmp_path, value, message):
    folder = with_predictors(plain, tmp_path / "bad", layer_sparsity=value)
    with pytest.raises(FlashLLMError, match=f"predictors.json: {message}".replace("[", r"\[")):
        FlashModel(folder, BIG, FlashSettings(mode="predictor"), 32, 16)
    result = runner.invoke(app, ["generate", str(folder), "the", "-n", "2", "--dram-budget", "1GB"])
    assert_one_line_error(result, message)
