"""Predictors and sparse modes: exactness at threshold 0, learnability, save/reload, perplexity, errors."""

import math

import pytest
import torch
from typer.testing import CliRunner

from flashllm import layout
from flashllm.cli import app
from flashllm.engine import load_dense
from flashllm.predictor import load_predictors, sparse_ffn, train_layer, train_predictors
from tests.test_cli_errors import assert_one_line_error
from tests.tiny import hf_logits, tiny_llama, tiny_opt, tiny_tokenizer

IDS = [5, 17, 3, 88, 41, 2, 60, 60, 9, 33, 71, 12]
runner = CliRunner()


def logits(model, ffn=None):
    return model.forward(torch.tensor(IDS), 0, model.new_cache(len(IDS)), ffn)


def test_relu_oracle_equals_dense(tmp_path):
    model = load_dense(tiny_opt(tmp_path / "opt")).model
    assert torch.equal(logits(model, sparse_ffn(model, [0.0] * 2)), logits(model))


def test_gated_threshold_zero_equals_dense(tmp_path):
    model = load_dense(tiny_llama(tmp_path / "llama")).model
    assert torch.equal(logits(model, sparse_ffn(model, [0.0] * 2)), logits(model))
    # and a positive threshold really changes the output (the test above could not pass by accident)
    assert not torch.equal(logits(model, sparse_ffn(model, [0.05] * 2)), logits(model))


def test_predictor_learns_a_low_rank_active_set():
    g = torch.Generator().manual_seed(0)
    d, n_ff, r = 48, 256, 6
    A, B = torch.randn(r, d, generator=g), torch.randn(n_ff, r, generator=g)
    x = torch.randn(6000, d, generator=g)
    y = (x @ A.T @ B.T) > 0.5  # [N, n_ff]: active sets decided by a rank-6 function of x
    fit = train_layer(x[:4000], y[:4000], x[4000:5000], y[4000:5000], rank=16, recall=0.97, epochs=6)
    pred = fit.predictor.logits(x[5000:]) >= fit.decision_threshold
    truth = y[5000:]
    recall = float((pred & truth).sum() / truth.sum())
    precision = float((pred & truth).sum() / pred.sum())
    assert recall > 0.95 and precision > 0.7


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pred")
    source = tiny_llama(root / "src", vocab_size=300, intermediate_size=256)
    tiny_tokenizer(source, 300)
    out = root / "bundle"
    layout.convert(source, out, dtype="float32")
    result = train_predictors(out, tokens=1024, eval_tokens=256, epochs=2, context=128)
    return source, out, result


def test_saved_predictors_reload_to_identical_outputs(trained):
    _, bundle, result = trained
    reloaded = load_predictors(bundle)
    x = torch.randn(5, 64)
    for layer in range(2):
        assert torch.equal(reloaded.logits(layer, x), result.predictors.logits(layer, x))
        assert torch.equal(reloaded.predict(layer, x), result.predictors.predict(layer, x))
    assert reloaded.activation_thresholds == result.predictors.activation_thresholds
    stats = reloaded.window_stats
    assert len(stats["distinct"]) == 2 and len(stats["distinct"][0]) == 8
    assert all(a <= b for a, b in zip(stats["distinct"][0], stats["distinct"][0][1:]))  # grows with K


def test_report_has_quality_and_layers(trained):
    report = trained[2].report
    assert {"dense", "oracle", "predictor"} <= set(report["quality"])
    assert len(report["layers"]) == 2 and 0 <= report["overall"]["recall"] <= 1


def test_cli_train_predictor(trained, tmp_path):
    source, _, _ = trained
    out = tmp_path / "bundle"
    layout.convert(source, out, dtype="float32")
    result = runner.invoke(app, ["train-predictor", str(out), "--tokens", "512", "--eval-tokens", "128",
                                 "--epochs", "1", "--context", "64", "--rank", "8"])
    assert result.exit_code == 0, result.output
    assert "recall" in result.stderr and load_predictors(out).ranks == [16, 16]  # last layers get 2x rank


def test_perplexity_dense_equals_hand_computed_from_transformers(trained, tmp_path):
    source, bundle, _ = trained
    from tokenizers import Tokenizer

    text = "x = 1\nif x:\n    print('assignment statements rebind names to objects')\n" * 6
    path = tmp_path / "text.txt"
    path.write_text(text)
    ids = Tokenizer.from_file(str(source / "tokenizer.json")).encode(text).ids
    context = 32
    nll, count = 0.0, 0
    for start in range(0, len(ids) - context + 1, context):  # llama-perplexity: score each chunk's 2nd half
        chunk = ids[start:start + context]
        logp = torch.log_softmax(hf_logits(source, chunk).double(), -1)
        for pos in range(context // 2, context - 1):
            nll -= float(logp[pos, chunk[pos + 1]])
            count += 1
    expected = math.exp(nll / count)
    result = runner.invoke(app, ["perplexity", str(bundle), str(path), "--context", str(context), "--json"])
    assert result.exit_code == 0, result.output
    import json

    got = json.loads(result.stdout)["dense"]["perplexity"]
    assert abs(got - expected) / expected < 1e-4


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing.txt", "no such file"),
    (lambda p: (p / "empty.txt").write_text("") and None or p / "empty.txt", "empty"),
    (lambda p: (p / "bin.dat").write_bytes(b"\0\1\2" * 100) and None or p / "bin.dat", "binary"),
])
def test_bad_corpus(trained, tmp_path, make, message):
    corpus = make(tmp_path)
    result = runner.invoke(app, ["train-predictor", str(trained[1]), "--corpus", str(corpus)])
    assert_one_line_error(result, message)


def test_not_a_bundle_and_rank_too_large(trained, tmp_path):
    assert_one_line_error(runner.invoke(app, ["train-predictor", str(tmp_path)]), "not a bundle")
    assert_one_line_error(runner.invoke(app, ["train-predictor", str(trained[1]), "--rank", "64"]), "below the model width")
