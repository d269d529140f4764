"""`flashllm perplexity`: dense equals a hand computation from transformers' logits, oracle at threshold
0 equals dense, the modes' options, and bad input."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from flashllm.cli import app
from flashllm.measure.perplexity import perplexity
from flashllm.sparsity.quality import chunks_of
from tests.test_cli_errors import assert_one_line_error
from tests.test_predictor import tiny_bundle
from tests.tiny import hf_logits

runner = CliRunner()
TEXT = "x = 1\nif x:\n    print('assignment statements rebind names to objects')\n" * 6


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("ppl"))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def test_dense_equals_hand_computed_from_transformers(bundle, text_file):
    from tokenizers import Tokenizer

    source = bundle.parent / "hf-llama"
    ids = Tokenizer.from_file(str(source / "tokenizer.json")).encode(TEXT).ids
    context = 32
    nll, count = 0.0, 0
    for start in range(0, len(ids) - context + 1, context):  # llama-perplexity: score each chunk's 2nd half
        chunk = ids[start:start + context]
        logp = torch.log_softmax(hf_logits(source, chunk).double(), -1)
        for pos in range(context // 2, context - 1):
            nll -= float(logp[pos, chunk[pos + 1]])
            count += 1
    expected = math.exp(nll / count)
    for model in (bundle, source):  # the bundle and the Hugging Face folder it came from
        result = runner.invoke(app, ["perplexity", str(model), str(text_file), "--context", str(context), "--json"])
        assert result.exit_code == 0, result.output
        got = json.loads(result.stdout)["dense"]
        assert abs(got["perplexity"] - expected) / expected < 1e-4
        assert got["tokens"] == count


def test_oracle_at_sparsity_zero_equals_dense(bundle, text_file):
    result = perplexity(bundle, text_file, mode="oracle", sparsity=0.0, context=32)
    assert result["oracle"].perplexity == result["dense"].perplexity
    assert result["oracle"].top1_agreement == 1.0 and result["oracle"].kl_divergence == 0.0


def test_oracle_calibrates_thresholds_without_predictors(bundle, text_file):
    result = perplexity(bundle, text_file, mode="oracle", sparsity=0.5, context=32)
    oracle = result["oracle"]
    assert abs(oracle.counts["true_active"] - 0.5) < 0.15  # calibrated on other text, so roughly 50%
    assert oracle.perplexity != result["dense"].perplexity
    assert any("calibrated" in note for note in oracle.notes)


def test_cli_text_output(bundle, text_file):
    result = runner.invoke(app, ["perplexity", str(bundle), str(text_file), "--context", "32", "--mode", "oracle",
                                 "--sparsity", "0.3"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("dense: perplexity") and "oracle: perplexity" in result.stdout
    assert "top-1" in result.stdout and "kept" in result.stdout


def test_chunks_replace_the_first_token_by_bos():
    chunks = chunks_of(list(range(10)), 4, bos=99)
    assert [c.tolist() for c in chunks] == [[99, 1, 2, 3], [99, 5, 6, 7]]


def test_bad_input(bundle, text_file, tmp_path):
    ppl = ["perplexity", str(bundle)]
    assert_one_line_error(runner.invoke(app, ppl + [str(tmp_path / "missing.txt")]), "no such file")
    (tmp_path / "empty.txt").write_text("")
    assert_one_line_error(runner.invoke(app, ppl + [str(tmp_path / "empty.txt")]), "empty")
    (tmp_path / "bin.dat").write_bytes(b"\0\1\2" * 100)
    assert_one_line_error(runner.invoke(app, ppl + [str(tmp_path / "bin.dat")]), "binary")
    assert_one_line_error(runner.invoke(app, ppl + [str(text_file), "--mode", "predictor"]), "train-predictor")
    assert_one_line_error(runner.invoke(app, ppl + [str(text_file), "--mode", "sideways"]), "unknown mode")
    assert_one_line_error(runner.invoke(app, ppl + [str(text_file), "--sparsity", "0.5"]), "--mode oracle")
    assert_one_line_error(runner.invoke(app, ppl + [str(text_file), "--recall", "0.9"]), "--mode predictor")
    assert_one_line_error(runner.invoke(app, ppl + [str(text_file), "--context", "4096"]), "needs at least")
    assert_one_line_error(runner.invoke(app, ppl + ["builtin:nonsense"]), "unknown built-in split")
    source = bundle.parent / "hf-llama"
    assert_one_line_error(runner.invoke(app, ["perplexity", str(source), str(text_file), "--dram-budget", "1GB"]),
                          "not a bundle")


def test_budgeted_engine_matches_the_reference_semantics(tmp_path, text_file):
    """--dram-budget runs the mode through the budgeted engine; its perplexity equals the in-DRAM reference."""
    from flashllm.sparsity.train import train_predictors

    bundle = tiny_bundle(tmp_path)
    train_predictors(bundle, tokens=1000, eval_tokens=0, context=64, epochs=1, sparsity=0.5)
    for mode in ("oracle", "predictor"):
        reference = perplexity(bundle, text_file, mode=mode, context=32)[mode]
        budgeted = perplexity(bundle, text_file, mode=mode, context=32, dram_budget="200MB")[mode]
        assert budgeted.perplexity == pytest.approx(reference.perplexity, rel=1e-5)
        assert budgeted.perplexity != perplexity(bundle, text_file, context=32)["dense"].perplexity
