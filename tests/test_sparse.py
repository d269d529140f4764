"""The budgeted engine: equal to dense with every neuron, cache vs streaming, planner, budgets, CLI."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from flashllm.bundle.writer import convert
from flashllm.cli import app
from flashllm.engine.generate import SamplingSettings, generate, load_dense
from flashllm.errors import FlashLLMError
from flashllm.models.ffn import active_mask, neuron_coefficients
from flashllm.engine.budget import plan_budget
from flashllm.engine.flash_model import FlashModel, FlashSettings
from flashllm.engine.stats import FlashStats
from flashllm.units import parse_size
from tests.test_cli_errors import assert_one_line_error
from tests.tiny import tiny_llama, tiny_opt

IDS = [5, 17, 3, 88, 41, 2, 60, 60, 9, 33]
BIG = 10**10


@pytest.fixture(params=["llama", "opt"])
def bundle(request, tmp_path):
    source = tiny_opt(tmp_path / "src") if request.param == "opt" else tiny_llama(tmp_path / "src")
    out = tmp_path / "bundle"
    convert(source, out, dtype="float32")
    return out


def flash_logits(flash: FlashModel, ids=IDS) -> torch.Tensor:
    """Prefill the first half, then decode the rest one token at a time through the flash FFN."""
    model = flash.model
    cache = model.new_cache(len(ids))
    half = len(ids) // 2
    out = [model.forward(torch.tensor(ids[:half]), 0, cache)]
    for pos in range(half, len(ids)):
        out.append(model.forward(torch.tensor([ids[pos]]), pos, cache))
    return torch.cat(out)


def dense_logits(folder, ffn=None, ids=IDS) -> torch.Tensor:
    model = load_dense(folder).model
    model = model.with_ffn(ffn) if ffn is not None else model
    return model.forward(torch.tensor(ids), 0, model.new_cache(len(ids)))


def test_every_neuron_equals_dense(bundle):
    for mode in ("oracle", "dense"):
        flash = FlashModel(bundle, BIG, FlashSettings(mode=mode), 32, 16)
        assert (flash_logits(flash) - dense_logits(bundle)).abs().max() < 1e-4
        tokens = list(flash.generate(IDS, SamplingSettings(max_tokens=8, stop_at_eos=False)))
        dense = load_dense(bundle).model
        assert tokens == list(generate(dense, IDS, SamplingSettings(max_tokens=8, stop_at_eos=False)))


def test_untied_embeddings_stay_on_flash(tmp_path):
    """An untied model's input embedding table is read a row per token from flash: not resident, not in
    the plan, and the logits are the dense model's; a tied table (the LM head) stays resident."""
    bundle = tmp_path / "untied"
    convert(tiny_llama(tmp_path / "src", vocab_size=512), bundle, dtype="float32")
    flash = FlashModel(bundle, BIG, FlashSettings(mode="dense"), 32, 16)
    assert flash.embedding is not None and "embed.weight" not in flash.model.weights
    resident = FlashModel(bundle, BIG, FlashSettings(mode="dense", flash_embedding=False), 32, 16)
    table = 512 * 64 * 4
    assert resident.plan.resident_bytes - flash.plan.resident_bytes == table - 16 * 64 * 4
    before = flash.reader.totals.bytes_read
    assert (flash_logits(flash) - dense_logits(bundle)).abs().max() < 1e-4
    assert flash.reader.totals.bytes_read > before
    repeated = [5, 5, 17, 5, 300, 17, 2, 2]  # repeated ids in the prefill: read once, placed everywhere
    assert (flash_logits(flash, repeated) - dense_logits(bundle, ids=repeated)).abs().max() < 1e-4
    tied = tmp_path / "tied"
    convert(tiny_llama(tmp_path / "src-tied", kind="llama-tied"), tied, dtype="float32")
    assert FlashModel(tied, BIG, FlashSettings(mode="dense"), 32, 16).embedding is None


def thresholded(bundle, budget=BIG) -> FlashModel:
    """The oracle with per-layer thresholds halfway between the two middle |a| of these tokens: it drops
    about half the neurons of a gated FFN (a ReLU FFN keeps a > 0)."""
    dense = load_dense(bundle).model
    if not dense.spec.gated:
        return FlashModel(bundle, budget, FlashSettings(mode="oracle"), 32, 16)
    medians = {}

    def record(layer, x):
        w = lambda name: dense.weights.get(f"layers.{layer}." + name)  # noqa: E731
        a = neuron_coefficients(dense.spec, x, w("ffn.gate.weight"), w("ffn.up.weight"), None)
        values = a.abs().flatten().sort().values
        middle = len(values) // 2  # halfway between two values: no neuron sits on the threshold, where
        medians[layer] = float(values[middle - 1] + values[middle]) / 2  # rounding order could flip it
        return dense.ffn_dense(layer, x)

    dense.with_ffn(record).forward(torch.tensor(IDS), 0, dense.new_cache(len(IDS)))
    thresholds = [medians[layer] for layer in range(dense.config.num_hidden_layers)]
    return FlashModel(bundle, budget, FlashSettings(mode="oracle"), 32, 16, thresholds=thresholds)


def test_cache_and_streaming_give_identical_outputs(bundle):
    big = thresholded(bundle)
    minimum = big.plan.fixed_bytes + big.bundle.config.num_hidden_layers * 20 * big.plan.record_bytes
    small = thresholded(bundle, minimum)
    assert max(small.plan.capacities) < small.spec.n_ff // 4  # most neurons stream past the cache
    assert (flash_logits(big) - flash_logits(small)).abs().max() < 1e-5
    assert small.reader.totals.bytes_read > big.reader.totals.bytes_read


def test_oracle_sparse_equals_masked_dense(bundle):
    flash = thresholded(bundle)
    dense = load_dense(bundle).model
    spec, p = dense.spec, "layers.{}."

    def masked(layer, x):
        w = lambda name: dense.weights.get(p.format(layer) + name)  # noqa: E731
        a = neuron_coefficients(spec, x, w("ffn.gate.weight"), w("ffn.up.weight"), w("ffn.up.bias"))
        return (a * active_mask(spec, a, flash.thresholds[layer])) @ w("ffn.down.weight").T

    expected = dense.with_ffn(masked).forward(torch.tensor(IDS), 0, dense.new_cache(len(IDS)))
    assert (flash_logits(flash) - expected).abs().max() < 1e-4


def test_a_prompts_prefill_keeps_every_neuron(bundle):
    """A last_only forward (a prompt's prefill, in passes or not) is computed with every neuron by the
    flash engine and by the reference sparse FFN; the steps after it are sparse."""
    from flashllm.sparsity.reference import sparse_ffn

    flash = thresholded(bundle)
    dense = load_dense(bundle).model
    ids = torch.tensor(IDS)
    expected = dense.forward(ids, 0, dense.new_cache(len(IDS)), last_only=True)
    reference = dense.with_ffn(sparse_ffn(dense, flash.thresholds))
    for model in (flash.model, reference):
        for max_pass in (None, 3):
            model.max_pass = max_pass
            got = model.forward(ids, 0, model.new_cache(len(IDS) + 1), last_only=True)
            assert (got - expected).abs().max() < 1e-4
    if dense.spec.gated:  # every position at once (scoring): sparse, so it differs
        sparse = reference.forward(ids, 0, reference.new_cache(len(IDS)))[-1:]
        assert (sparse - expected).abs().max() > 1e-4


@pytest.mark.parametrize("policy", ["lru", "window", "pinned"])
def test_policies_run_within_capacity(bundle, policy):
    flash = FlashModel(bundle, BIG, FlashSettings(mode="dense", policy=policy), 32, 16)
    quarter = flash.bundle.config.num_hidden_layers * flash.spec.n_ff * (flash.plan.record_bytes + 16) // 4
    flash = FlashModel(bundle, flash.plan.fixed_bytes + quarter, FlashSettings(mode="dense", policy=policy), 32, 16)
    assert 0 < max(flash.plan.capacities) < flash.spec.n_ff
    stats = FlashStats()
    list(flash.generate(IDS, SamplingSettings(max_tokens=6, stop_at_eos=False), stats=stats))
    for cache in flash.caches:
        cache.check()
        assert cache.num_used <= cache.capacity
    assert stats.tokens == 5 and stats.bytes_read > 0
    assert stats.kernel_bytes_read is None or stats.kernel_bytes_read >= 0.9 * stats.bytes_read


@settings(max_examples=40, deadline=None)
@given(extra=st.integers(0, 5 * 10**6), weights=st.lists(st.floats(0, 1e4), min_size=2, max_size=2),
       fixed_part=st.integers(0, 10**7), n_ff=st.integers(1, 4096), record=st.integers(1, 9216))
def test_planner_never_plans_more_than_the_budget(extra, weights, fixed_part, n_ff, record):
    fixed = plan_budget(BIG, {"resident weights": fixed_part}, n_ff, 2, record, weights).fixed_bytes
    plan = plan_budget(fixed + extra, {"resident weights": fixed_part}, n_ff, 2, record, weights)
    assert plan.planned_bytes <= fixed + extra
    assert all(0 <= c <= n_ff for c in plan.capacities)
    assert plan.fixed_bytes == fixed and plan.parts["resident weights"] == fixed_part


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    out = root / "bundle"
    convert(tiny_llama(root / "src"), out)
    return out


def test_budget_below_minimum_names_it(tiny_bundle):
    with pytest.raises(FlashLLMError, match="below the minimum"):
        FlashModel(tiny_bundle, 1000, FlashSettings(), 32, 8)


@pytest.mark.parametrize("text,expected", [("1.5GB", 1_500_000_000), ("800MiB", 800 * 2**20), ("50%", 500),
                                           ("2048", 2048), ("1.5 gib", int(1.5 * 2**30))])
def test_parse_size(text, expected):
    assert parse_size(text, 1000) == expected


@pytest.mark.parametrize("text", ["lots", "1.5XB", "-3GB", "", "50%%"])
def test_malformed_budget(text):
    with pytest.raises(FlashLLMError, match="malformed size"):
        parse_size(text, 1000)


runner = CliRunner()


@pytest.mark.realmodel
def test_cli_generate_under_budget_json(smollm2_bundle):
    result = runner.invoke(app, ["generate", str(smollm2_bundle), "The capital of France is", "-n", "8",
                                 "--dram-budget", "60%", "--stats", "json"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout
    stats = json.loads(result.stderr.strip().splitlines()[-1])
    for key in ("tokens", "budget_bytes", "planned_bytes", "peak_rss_bytes", "bytes_read", "kernel_bytes_read",
                "ms_per_token", "tokens_per_s", "cache_hit_rate", "sparsity", "window"):
        assert key in stats
    assert set(stats["ms_per_token"]) >= {"io", "memory", "compute", "predictor", "total"}
    assert stats["planned_bytes"] <= stats["budget_bytes"]
    assert stats["bytes_read"] > 0 and stats["kernel_bytes_read"] >= 0.9 * stats["bytes_read"]


@pytest.mark.realmodel
@pytest.mark.parametrize("budget,message", [("5MB", "below the minimum"), ("fifty", "malformed budget")])
def test_cli_bad_budgets(smollm2_bundle, budget, message):
    result = runner.invoke(app, ["generate", str(smollm2_bundle), "hi", "--dram-budget", budget])
    assert_one_line_error(result, message)


@pytest.mark.realmodel
def test_cli_prompt_longer_than_context(smollm2_bundle):
    result = runner.invoke(app, ["generate", str(smollm2_bundle), "word " * 8300, "--dram-budget", "90%"])
    assert_one_line_error(result, "context holds 8192")


def test_cli_budget_needs_a_bundle(tmp_path):
    folder = tiny_llama(tmp_path / "src")
    (folder / "tokenizer.json").write_text("{}")
    assert_one_line_error(runner.invoke(app, ["generate", str(folder), "hi", "--dram-budget", "50%"]), "not a bundle")


@pytest.fixture(scope="module")
def int4_bundles(tmp_path_factory):
    """A tiny gated model as a split and a bundled bundle, each with int4 predictors (a few seconds)."""
    from flashllm.sparsity.train import train_predictors
    from tests.tiny import tiny_tokenizer

    root = tmp_path_factory.mktemp("int4")
    source = tiny_llama(root / "src", vocab_size=300)
    tiny_tokenizer(source, 300)
    out = {}
    for kind in ("split", "bundled"):
        out[kind] = root / kind
        convert(source, out[kind], dtype="float32", layout=kind)
        train_predictors(out[kind], tokens=1500, eval_tokens=0, context=64, sparsity=0.5)
    return out


def test_int4_gate_up_reads_only_down_and_computes_with_the_estimate(int4_bundles):
    """--gate-up int4: a~ from the 4-bit gate/up, kept where |a~| > t_l, times the down columns read from
    flash; the cache holds down columns only, so it fits three times the neurons of whole records."""
    from flashllm.sparsity.predictors import load_predictors

    folder = int4_bundles["split"]
    exact = FlashModel(folder, BIG, FlashSettings(mode="predictor"), 32, 16)
    flash = FlashModel(folder, BIG, FlashSettings(mode="predictor", gate_up="int4"), 32, 16)
    d, itemsize = flash.spec.d, 4
    assert flash.plan.record_bytes == d * itemsize and exact.plan.record_bytes == 3 * d * itemsize
    dense = load_dense(folder).model
    predictors = load_predictors(folder)
    t = predictors.activation_thresholds

    def estimated(layer, x):
        a = predictors.layers[layer].coefficients(x)
        return (a * (a.abs() > t[layer])) @ dense.weights[f"layers.{layer}.ffn.down.weight"].T

    expected = dense.with_ffn(estimated).forward(torch.tensor(IDS), 0, dense.new_cache(len(IDS)))
    assert (flash_logits(flash) - expected).abs().max() < 1e-4
    totals, embedding_rows = flash.reader.totals, 10  # one row per token: the model is untied
    assert totals.records == flash.ffn.counters.needed - flash.ffn.counters.hit + embedding_rows
    assert totals.bytes_useful == totals.records * d * itemsize  # down columns (and rows), nothing else
    budget = exact.plan.fixed_bytes + 2 * flash.spec.n_ff * (exact.plan.record_bytes + 16) // 4
    small = FlashModel(folder, budget, FlashSettings(mode="predictor", gate_up="int4"), 32, 16)
    whole = FlashModel(folder, budget, FlashSettings(mode="predictor"), 32, 16)
    assert sum(small.plan.capacities) >= 2.5 * sum(whole.plan.capacities)


def test_int4_gate_up_needs_split_layout_and_int4_predictors(int4_bundles, tmp_path):
    with pytest.raises(FlashLLMError, match="split layout"):
        FlashModel(int4_bundles["bundled"], BIG, FlashSettings(mode="predictor", gate_up="int4"), 32, 16)
    with pytest.raises(FlashLLMError, match="int4 predictors"):
        FlashModel(int4_bundles["split"], BIG, FlashSettings(mode="oracle", gate_up="int4"), 32, 16)
    with pytest.raises(FlashLLMError, match="--gate-up"):
        FlashModel(int4_bundles["split"], BIG, FlashSettings(mode="predictor", gate_up="int8"), 32, 16)
    opt = tmp_path / "opt"
    convert(tiny_opt(tmp_path / "src"), opt, dtype="float32", layout="split")
    with pytest.raises(FlashLLMError, match="gated"):
        FlashModel(opt, BIG, FlashSettings(mode="predictor", gate_up="int4"), 32, 16)
    result = runner.invoke(app, ["generate", str(int4_bundles["bundled"]), "hi", "--dram-budget", "90%",
                                 "--gate-up", "int4", "-n", "2"])
    assert_one_line_error(result, "split layout")
    result = runner.invoke(app, ["generate", str(int4_bundles["split"]), "hi", "--gate-up", "int4", "-n", "2"])
    assert_one_line_error(result, "--dram-budget")


def test_predictors_that_do_not_fit_are_dropped_not_refused(int4_bundles):
    """A budget above the floor but below floor + predictors runs: every neuron is read, and it says so."""
    folder = int4_bundles["bundled"]
    dense = FlashModel(folder, BIG, FlashSettings(mode="dense"), 32, 16)
    with_predictors = FlashModel(folder, BIG, FlashSettings(mode="predictor"), 32, 16)
    assert with_predictors.mode == "predictor" and with_predictors.plan.parts["predictors"] > 0
    budget = dense.plan.fixed_bytes + with_predictors.plan.parts["predictors"] // 2
    flash = FlashModel(folder, budget, FlashSettings(mode="predictor"), 32, 16)
    assert flash.mode == "dense" and flash.predictors is None and flash.plan.parts["predictors"] == 0
    assert flash.notes and "do not fit" in flash.notes[0]
    assert flash.thresholds == [0.0] * len(flash.thresholds)  # dense: no neuron is dropped
    assert flash.plan.planned_bytes <= budget
    with pytest.raises(FlashLLMError, match="below the minimum"):
        FlashModel(folder, dense.plan.fixed_bytes - 1, FlashSettings(mode="predictor"), 32, 16)
