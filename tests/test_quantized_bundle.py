"""Quantized bundles: convert picks each tensor's kind, the records and resident tensors hold quantized rows,
and the budgeted engine on them equals the dense model of the same quantized weights."""

import json

import pytest
import torch

from flashllm.bundle.reader import Bundle
from flashllm.bundle.verify import verify
from flashllm.bundle.writer import convert
from flashllm.engine.flash_model import FlashModel, FlashSettings
from flashllm.engine.generate import SamplingSettings, load_dense
from flashllm.engine.stats import FlashStats
from flashllm import native
from flashllm.models import packed
from flashllm.models.qrows import Int8Groups, QRows, row_bytes
from flashllm.sources.base import Source
from flashllm.models.quant import Int4Matrix
from tests.test_sparse import IDS, flash_logits
from tests.tiny import tiny_llama, tiny_tokenizer

BIG = 10**10


@pytest.fixture(scope="module", params=["int4", "int8"])
def quantized(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    out = root / "bundle"
    source = tiny_llama(root / "src", vocab_size=256)
    tiny_tokenizer(source, 256)
    convert(source, out, dtype=request.param)
    return request.param, out


def test_convert_stores_every_matrix_in_the_asked_kind(quantized):
    kind, folder = quantized
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["weights"] == kind
    kinds = manifest["resident"]["kinds"]
    assert kinds["layers.0.attn.q.weight"] == kind and kinds["embed.weight"] == kind
    assert "layers.0.attn_norm.weight" not in kinds  # vectors stay in the float dtype
    parts = {p["name"]: p for r in manifest["ffn"]["layers"][0]["regions"] for p in r["parts"]}
    assert {name: p.get("kind") for name, p in parts.items()} == {"gate": kind, "up": kind, "down": kind}
    bundle = Bundle(folder)
    assert bundle.quantized and bundle.compute_dtype == torch.float32
    assert bundle.record_layout(0).record_bytes == 3 * row_bytes(kind, 64)
    assert verify(folder) == []


def test_quantized_rows_are_within_half_a_step_of_the_source(quantized, tmp_path):
    kind, folder = quantized
    reference = load_dense(tiny_llama(tmp_path / "src", vocab_size=256)).model.weights
    dense = load_dense(folder).model.weights  # the bundle's rows expanded to float32
    for name in ("layers.1.attn.q.weight", "layers.0.ffn.gate.weight", "layers.1.ffn.down.weight", "embed.weight"):
        w, q = reference[name], dense[name]
        rows = w.T if name.endswith("down.weight") else w  # down is stored by columns
        groups = rows.reshape(rows.shape[0], -1, 32)
        step = (groups.amax(-1) - groups.amin(-1)) / 15 if kind == "int4" else groups.abs().amax(-1) / 127
        err = ((q.T if name.endswith("down.weight") else q) - rows).abs().reshape_as(groups)
        assert bool((err <= step.unsqueeze(-1) * 0.5 + 1e-3 * step.unsqueeze(-1) + 1e-6).all()), name


def test_engine_on_every_neuron_equals_the_dense_quantized_model(quantized):
    kind, folder = quantized
    flash = FlashModel.open(folder, BIG, FlashSettings(mode="dense"), 32, 16)
    if kind == "int4":  # resident matrices compute in torch's int4 kernel; the embedding stays rows
        assert isinstance(flash.model.weights["layers.0.attn.q.weight"], (Int4Matrix, QRows))
    dense = load_dense(folder).model
    reference = dense.forward(torch.tensor(IDS), 0, dense.new_cache(len(IDS)))
    ours = flash_logits(flash)
    # the int4 kernel keeps scale and zero in bfloat16: a few parts in a thousand of the logits' range
    tolerance = 2e-2 * float(reference.abs().max()) if kind == "int4" else 1e-4 * float(reference.abs().max())
    assert (ours - reference).abs().max() < tolerance
    # streaming every record past a tiny cache gives the same numbers as holding them all
    small = FlashModel.open(folder, flash.plan.fixed_bytes + 2 * 3 * flash.plan.record_bytes * 16,
                            FlashSettings(mode="dense"), 32, 16)
    assert max(small.plan.capacities) < flash.spec.n_ff
    assert flash.native == small.native == native.available()  # the C FFN where it builds, else the kernels
    assert flash.kernel_form == small.kernel_form == (kind == "int4" and packed.available() and not flash.native)
    assert (flash_logits(small) - ours).abs().max() < 1e-5
    # dense mode knows each layer's needs in advance: the C FFN's stream reads the next layer's first chunk
    assert small.ffn.counters.read_ahead > 0 if small.native else small.ffn.counters.read_ahead == 0
    tokens = list(small.generate(IDS, SamplingSettings(max_tokens=4, stop_at_eos=False)))
    assert small.ffn._ahead is None  # no read left in flight past a pass's last layer (wasted, counted by timing)
    assert tokens == list(flash.generate(IDS, SamplingSettings(max_tokens=4, stop_at_eos=False)))


def test_kernel_form_caches_compute_like_expanded_records(quantized):
    """int4 gate/up cached in the kernel's layout give the numbers of the expanded records up to the
    kernel's bfloat16, and every byte of the stores is in the plan."""
    kind, folder = quantized
    if kind != "int4" or not packed.available():
        pytest.skip("kernel-form caches hold int4 gate/up rows")
    expanded = FlashModel.open(folder, BIG, FlashSettings(mode="dense", kernel_cache=False, native=False), 32, 16)
    reference = flash_logits(expanded)
    settings = FlashSettings(mode="dense", native=False)  # the kernel form is the path without the C FFN
    whole = FlashModel.open(folder, BIG, settings, 32, 16)
    budget = whole.plan.fixed_bytes + 3 * whole.plan.record_bytes * 40  # caches smaller than the FFN
    for flash in (whole, FlashModel.open(folder, budget, settings, 32, 16)):
        assert flash.kernel_form and not expanded.kernel_form
        assert (flash_logits(flash) - reference).abs().max() < 2e-2 * float(reference.abs().max())
        parts = flash.plan.parts
        caches = sum(cache.nbytes for cache in flash.caches)
        assert caches <= flash.plan.cache_bytes + parts["cache index"]  # the stores' padding comes out of it
        assert flash.ffn.nbytes <= parts["FFN work"]
        list(flash.generate(IDS, SamplingSettings(max_tokens=6, stop_at_eos=False)))
        assert sum(cache.nbytes for cache in flash.caches) == caches  # nothing grows while generating
    assert max(flash.plan.capacities) < flash.spec.n_ff


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """What convert auto makes of a Q4 GGUF: int4 gate/up records, int8 down columns, an int8 LM head."""
    root = tmp_path_factory.mktemp("mixed")
    source = tiny_llama(root / "src", vocab_size=256)
    tiny_tokenizer(source, 256)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Source, "precision_of", lambda self, name: "int8" if name == "lm_head.weight" else "int4")
        convert(source, root / "bundle", dtype="auto")
    return root / "bundle"


def test_int8_down_columns_and_head_in_kernel_form(mixed, monkeypatch):
    """int4 gate/up and int8 down cached in the kernels' forms, and the int8 LM head in groups for the int8
    kernel: the numbers of the expanded records and rows up to bfloat16, whole cache or streamed, every
    byte of the stores in the plan, nothing growing while generating."""
    if not packed.available():
        pytest.skip("kernel-form caches need torch's int4 kernel")
    layout = Bundle(mixed).record_layout(0)
    assert {p.name: p.kind for p in layout.parts} == {"gate": "int4", "up": "int4", "down": "int8"}
    expanded = FlashModel.open(mixed, BIG, FlashSettings(mode="dense", kernel_cache=False, native=False), 32, 16)
    assert isinstance(expanded.model.weights["lm_head.weight"], QRows)  # the vocabulary is below GROUPED_MIN_ROWS
    reference = flash_logits(expanded)
    monkeypatch.setattr("flashllm.engine.flash_model.GROUPED_MIN_ROWS", 64)
    settings = FlashSettings(mode="dense", native=False)
    whole = FlashModel.open(mixed, BIG, settings, 32, 16)
    budget = whole.plan.fixed_bytes + whole.plan.record_bytes * 3 * 40  # caches smaller than the FFN
    for flash in (whole, FlashModel.open(mixed, budget, settings, 32, 16)):
        assert flash.kernel_form and all(len(stores) == 3 for stores in flash.ffn.packed)
        assert isinstance(flash.model.weights["lm_head.weight"], Int8Groups)
        assert all(cache.matrix.shape[1] == 0 for cache in flash.caches)  # the down columns live in the stores
        assert (flash_logits(flash) - reference).abs().max() < 2e-2 * float(reference.abs().max())
        parts = flash.plan.parts
        caches = sum(cache.nbytes for cache in flash.caches)
        assert caches <= flash.plan.cache_bytes + parts["cache index"]
        assert flash.ffn.nbytes <= parts["FFN work"]
        tokens = list(flash.generate(IDS, SamplingSettings(max_tokens=6, stop_at_eos=False)))
        assert sum(cache.nbytes for cache in flash.caches) == caches
    assert max(flash.plan.capacities) < flash.spec.n_ff
    assert tokens == list(whole.generate(IDS, SamplingSettings(max_tokens=6, stop_at_eos=False)))


def test_quantized_bundle_needs_less_dram_than_float16(quantized, tmp_path):
    kind, folder = quantized
    fp16 = tmp_path / "fp16"
    convert(tiny_llama(tmp_path / "src", vocab_size=256), fp16, dtype="float16")
    q = FlashModel.open(folder, BIG, FlashSettings(mode="dense"), 32, 16)
    f = FlashModel.open(fp16, BIG, FlashSettings(mode="dense"), 32, 16)
    assert q.plan.parts["resident weights"] < f.plan.parts["resident weights"]
    assert q.plan.record_bytes < f.plan.record_bytes


def test_converting_a_quantized_bundle_keeps_its_rows(quantized, tmp_path):
    kind, folder = quantized
    split = tmp_path / "split"
    convert(folder, split, dtype=kind, layout="split")
    a, b = Bundle(folder), Bundle(split)
    assert a.kinds == b.kinds
    for name in ("layers.0.ffn.gate.weight", "layers.1.ffn.down.weight"):
        assert torch.equal(a.dense_ffn(int(name.split(".")[1]))[name], b.dense_ffn(int(name.split(".")[1]))[name])


def test_int4_predictors_of_an_int4_bundle_are_its_own_gate_up(tmp_path):
    """On an int4 bundle the 4-bit predictor is the layer's own gate/up (same codes, nothing requantized),
    so --gate-up int4 (gate/up from DRAM, only down columns read) computes the model itself."""
    from safetensors.torch import load_file

    from flashllm.sparsity.train import train_predictors

    out = tmp_path / "split"
    # predictors (gate/up) larger than what reading only down columns saves in the FFN's buffers, so a
    # budget can hold whole records without the predictors but not the predictors
    source = tiny_llama(tmp_path / "src", vocab_size=256, hidden_size=256, intermediate_size=2048,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    tiny_tokenizer(source, 256)
    convert(source, out, dtype="int4", layout="split")
    train_predictors(out, tokens=1500, eval_tokens=0, context=64, sparsity=0.5)
    bundle, stored = Bundle(out), load_file(str(out / "predictors.safetensors"))
    for layer in range(bundle.config.num_hidden_layers):
        q = bundle.dense_ffn(layer, keep_quantized=True)
        gate, up = q[f"layers.{layer}.ffn.gate.weight"], q[f"layers.{layer}.ffn.up.weight"]
        codes = stored[f"layers.{layer}.predictor.codes"]
        assert torch.equal(codes[:2 * gate.n], torch.cat([gate.codes, up.codes]))
    L = bundle.config.num_hidden_layers
    flash = FlashModel.open(out, BIG, FlashSettings(mode="predictor", gate_up="int4"), max_tokens=len(IDS),
                            prefill_tokens=5, thresholds=[0.0] * L)
    dense = load_dense(out).model
    expected = dense.forward(torch.tensor(IDS), 0, dense.new_cache(len(IDS)))
    got = flash_logits(flash)
    # the same weights up to the kernel's bfloat16 scales and zeros (2^-9 relative)
    assert (got - expected).abs().max().item() < 0.02 * expected.abs().max().item()
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()
    # the planner takes that layout by itself where it fits, and says what it passes over where not
    assert json.loads((out / "predictors.json").read_text())["int4_source"] == "bundle"
    # (the torch path's buffers, as this tiny model's sizes were chosen for; the C FFN's larger stream chunks
    # would tip the comparison below)
    # where every neuron fits in the kernels' form the predictors would only add work: dense, none loaded
    whole = FlashModel.open(out, BIG, FlashSettings(mode="predictor", native=False), max_tokens=len(IDS), prefill_tokens=5)
    assert whole.mode == "dense" and whole.predictors is None and min(whole.plan.capacities) == whole.spec.n_ff
    assert len(whole.notes) == 1 and "every neuron fits" in whole.notes[0]
    auto = FlashModel.open(out, whole.plan.planned_bytes - 1, FlashSettings(mode="predictor", native=False), max_tokens=len(IDS),
                           prefill_tokens=5)
    assert auto.gate_up == "int4" and auto.mode == "predictor" and not auto.notes
    dense = FlashModel.open(out, BIG, FlashSettings(mode="dense", gate_up="flash", native=False), max_tokens=len(IDS),
                            prefill_tokens=5)
    assert auto.plan.fixed_bytes > dense.plan.fixed_bytes + 10_000
    small = FlashModel.open(out, dense.plan.fixed_bytes + 10_000, FlashSettings(mode="predictor", native=False),
                            max_tokens=len(IDS), prefill_tokens=5)
    assert small.gate_up == "flash" and small.mode == "dense" and small.predictors is None
    assert len(small.notes) == 2 and "only down columns" in small.notes[0]


def test_bench_serves_a_quantized_bundle(quantized):
    """naive (the flash engine) and page-cache (compute straight over the mapped records and resident rows)
    run on a quantized bundle and agree with the resident model."""
    from flashllm.measure.bench import BenchSettings, run_bench

    kind, folder = quantized
    report = run_bench(folder, BenchSettings(budget="1GB", prompts=1, prompt_tokens=8, tokens=8,
                                             strategies=("naive", "page-cache")))
    rows = {r["name"]: r for r in report["strategies"]}
    for name in ("naive", "page-cache"):
        assert rows[name]["tokens"] > 0 and not rows[name]["note"].startswith("failed"), rows[name]["note"]
        assert rows[name]["top1_agreement"] >= 0.85
        assert rows[name]["perplexity"] == pytest.approx(rows["resident"]["perplexity"], rel=0.02)


def test_c_ffn_computes_like_expanded_records(mixed):
    """The C FFN (flashllm.native) over cached and streamed records gives the expanded records' numbers up
    to float32 summation order (no bfloat16 anywhere), each record with its own column of the needed mask
    (oracle mode: a sparse mask), counts every byte it keeps in the plan, and needs no kernel-form stores."""
    if not native.available():
        pytest.skip(f"the C FFN is not available here: {native.why_not()}")
    L = Bundle(mixed).config.num_hidden_layers

    def engine(budget, **settings):
        return FlashModel.open(mixed, budget, FlashSettings(mode="oracle", **settings), 32, 16, thresholds=[0.003] * L)

    expanded = engine(BIG, kernel_cache=False, native=False)
    reference = flash_logits(expanded)
    whole = engine(BIG)
    budget = whole.plan.fixed_bytes + whole.plan.record_bytes * 3 * 40  # caches smaller than the FFN
    for flash in (whole, engine(budget)):
        assert flash.native and not flash.kernel_form and all(stores is None for stores in flash.ffn.packed)
        assert flash.ffn.stream_stores is None
        assert flash.workspace is None  # nothing is expanded: the plan counts only native.matmul's split of x
        assert flash.plan.parts["quantized work"] == native.matmul_work_bytes(flash.spec.d, 16)
        assert (flash_logits(flash) - reference).abs().max() < 1e-4 * float(reference.abs().max())
        flash_logits(flash, ids=IDS[::-1])  # then a multi-token pass meeting a warm cache whose slots are out of order
        assert (flash_logits(flash) - reference).abs().max() < 1e-4 * float(reference.abs().max())
        caches = sum(cache.nbytes for cache in flash.caches)
        assert caches == flash.plan.cache_bytes + flash.plan.parts["cache index"]
        assert flash.ffn.nbytes <= flash.plan.parts["FFN work"]
        tokens = list(flash.generate(IDS, SamplingSettings(max_tokens=6, stop_at_eos=False)))
        assert sum(cache.nbytes for cache in flash.caches) == caches
    assert max(flash.plan.capacities) < flash.spec.n_ff
    assert tokens == list(expanded.generate(IDS, SamplingSettings(max_tokens=6, stop_at_eos=False)))


def test_int8_dot_products_through_the_engine(mixed):
    """--dots int8: the C FFN and every quantized resident matrix (int4 ones kept as rows, not in torch's
    int4 kernel form) take integer dot products over x quantized to int8 groups; near the float32 engine's
    logits, not equal to them, and the same whether records are cached or streamed."""
    if not native.available():
        pytest.skip(f"the C FFN is not available here: {native.why_not()}")
    L = Bundle(mixed).config.num_hidden_layers

    def engine(budget, **settings):
        return FlashModel.open(mixed, budget, FlashSettings(mode="dense", **settings), 32, 16, thresholds=[0.0] * L)

    exact = flash_logits(engine(BIG))
    whole = engine(BIG, dots="int8")
    assert whole.native and whole.model.int8_x and all(f.int8_x for f in whole.ffn.native)
    resident = [w for w in whole.model.weights.values() if not isinstance(w, torch.Tensor)]
    assert resident and not any(isinstance(w, Int4Matrix) for w in resident)
    assert any(isinstance(w, QRows) and w.kind == "int4" for w in resident)
    fast = flash_logits(whole)
    assert not torch.equal(fast, exact)
    assert (fast - exact).abs().max() < 0.05 * float(exact.abs().max())
    streamed = engine(whole.plan.fixed_bytes + whole.plan.record_bytes * 3 * 40, dots="int8")
    assert max(streamed.plan.capacities) < streamed.spec.n_ff
    assert (flash_logits(streamed) - fast).abs().max() < 1e-3 * float(fast.abs().max())
    stats = FlashStats()
    list(streamed.generate(IDS, SamplingSettings(max_tokens=4, stop_at_eos=False), stats=stats))
    assert stats.dots == "int8"
