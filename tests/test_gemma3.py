"""Gemma 3 against transformers: a tiny random model (local and global layers, a window shorter than the
prompt) through convert, and its config and tokenizer pieces. The real 270M model: tests below, marked."""

import pytest
import torch

from flashllm.bundle.writer import convert
from flashllm.engine.flash_model import FlashModel, FlashSettings
from flashllm.engine.generate import SamplingSettings, generate, load_dense
from flashllm.errors import FlashLLMError
from flashllm.models.gemma3 import FULL, SLIDING, Gemma3Config
from flashllm.sparsity.reference import sparse_ffn
from tests.tiny import hf_logits, tiny_gemma3

IDS = [5, 17, 3, 88, 41, 2, 60, 60, 9, 33, 71, 12, 0, 95]  # 14 tokens, the window is 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF folder, float32 bundle converted from it)."""
    root = tmp_path_factory.mktemp("gemma3")
    source = tiny_gemma3(root / "hf")
    convert(source, root / "bundle", dtype="float32")
    return source, root / "bundle"


def stepwise_logits(model, ids, prefix=5):
    """Prefill `prefix` tokens, then one token at a time through the cache."""
    cache = model.new_cache(len(ids))
    out = [model.forward(torch.tensor(ids[:prefix]), 0, cache)]
    for pos in range(prefix, len(ids)):
        out.append(model.forward(torch.tensor([ids[pos]]), pos, cache))
    return torch.cat(out)


def test_tiny_logits_equal_transformers(tiny):
    source, bundle = tiny
    expected = hf_logits(source, IDS)
    model = load_dense(bundle).model
    assert model.config.layer_types == [SLIDING, FULL, SLIDING]
    whole = model.forward(torch.tensor(IDS), 0, model.new_cache(len(IDS)))
    assert (whole - expected).abs().max().item() < 1e-5
    assert (stepwise_logits(model, IDS) - expected).abs().max().item() < 1e-5


def test_the_window_matters_in_this_test(tmp_path, tiny):
    """The same weights with a window longer than the prompt give other logits: the window is exercised."""
    wide = hf_logits(tiny_gemma3(tmp_path / "wide", sliding_window=64), IDS)
    assert (wide - hf_logits(tiny[0], IDS)).abs().max().item() > 1e-2


@pytest.mark.parametrize("max_pass", [1, 3, 6])
def test_prefill_in_passes_equals_one_pass(tiny, max_pass):
    """Passes that start inside a window see the keys of the pass before."""
    model = load_dense(tiny[1]).model
    whole = model.forward(torch.tensor(IDS), 0, model.new_cache(len(IDS)), last_only=True)
    model.limit_pass(max_pass)
    passes = model.forward(torch.tensor(IDS), 0, model.new_cache(len(IDS)), last_only=True)
    assert (passes - whole).abs().max().item() < 1e-5


def test_sparse_and_flash_with_every_neuron_equal_dense(tiny):
    bundle = tiny[1]
    model = load_dense(bundle).model
    dense = model.forward(torch.tensor(IDS), 0, model.new_cache(len(IDS)))
    sparse = model.with_ffn(sparse_ffn(model, [0.0] * 3)).forward(torch.tensor(IDS), 0, model.new_cache(len(IDS)))
    assert torch.equal(dense, sparse)
    settings = SamplingSettings(max_tokens=6, stop_at_eos=False)
    for mode in ("oracle", "dense"):
        flash = FlashModel(bundle, 10**10, FlashSettings(mode=mode), 32, 16)
        assert (stepwise_logits(flash.model, IDS) - dense).abs().max().item() < 1e-4
        assert list(flash.generate(IDS, settings)) == list(generate(model, IDS, settings))


def test_config_round_trips_through_the_manifest(tiny):
    config = load_dense(tiny[1]).model.config
    assert Gemma3Config.from_hf(config.to_dict()) == config
    assert (config.rope_theta, config.rope_local_base_freq, config.query_pre_attn_scalar) == (1e6, 1e4, 24)


def test_old_style_config_fields():
    """Before rope_parameters and layer_types: rope_theta, rope_local_base_freq and a sliding window pattern."""
    config = Gemma3Config.from_hf({"model_type": "gemma3_text", "num_hidden_layers": 7, "rope_theta": 1e6,
                                   "rope_local_base_freq": 1e4, "sliding_window_pattern": 3})
    assert config.layer_types == [SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL, SLIDING]
    assert (config.rope_theta, config.rope_local_base_freq) == (1e6, 1e4)


def test_gguf_metadata_gives_llama_cpps_layout():
    meta = {"gemma3.block_count": 12, "gemma3.embedding_length": 64, "gemma3.feed_forward_length": 128,
            "gemma3.attention.head_count": 4, "gemma3.attention.head_count_kv": 1, "gemma3.attention.key_length": 32,
            "gemma3.attention.sliding_window": 8, "gemma3.rope.freq_base": 1e6, "tokenizer.ggml.tokens": ["a"] * 50}
    config = Gemma3Config.from_gguf(meta, "gemma3", {"token_embd.weight"})
    assert [i for i, kind in enumerate(config.layer_types) if kind == FULL] == [5, 11]
    assert (config.sliding_window, config.query_pre_attn_scalar, config.vocab_size) == (8, 32, 50)
    assert config.tie_word_embeddings and config.rope_local_base_freq == 1e4
    pattern = Gemma3Config.from_gguf({**meta, "gemma3.attention.sliding_window_pattern": [True, False] * 6},
                                     "gemma3", {"output.weight"})
    assert pattern.layer_types[:2] == [SLIDING, FULL] and not pattern.tie_word_embeddings


def test_attention_softcapping_is_refused(tmp_path):
    source = tiny_gemma3(tmp_path / "hf", attn_logit_softcapping=50.0)
    with pytest.raises(FlashLLMError, match="softcapping"):
        convert(source, tmp_path / "out", dtype="float32")


def test_final_logit_softcapping(tmp_path):
    source = tiny_gemma3(tmp_path / "hf", final_logit_softcapping=0.3)
    model = load_dense(source).model
    logits = model.forward(torch.tensor(IDS), 0, model.new_cache(len(IDS)))
    assert logits.abs().max().item() < 0.3
    assert (logits - hf_logits(source, IDS)).abs().max().item() < 1e-5


# -- the real Gemma 3 270M (Q4_K_M GGUF) against transformers' own GGUF loader ------------------------
PROMPT, CONTINUATION = "The capital of France is", " the capital of the country of France. It is the largest"


@pytest.fixture(scope="module")
def hf(gemma3_gguf):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def real(gemma3_gguf):
    return load_dense(gemma3_gguf)


@pytest.mark.realmodel
def test_real_config_from_gguf(real):
    c = real.model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.head_dim) == (18, 640, 2048, 256)
    assert (c.num_attention_heads, c.num_key_value_heads, c.sliding_window, c.query_pre_attn_scalar) == (4, 1, 512, 256)
    assert [i for i, kind in enumerate(c.layer_types) if kind == FULL] == [5, 11, 17]
    assert (c.rope_theta, c.rope_local_base_freq, c.tie_word_embeddings) == (1e6, 1e4, True)


@pytest.mark.realmodel
def test_real_logits_match_transformers(hf, real):
    """600 tokens: past the 512-token window of the local layers."""
    from pydoc_data import topics

    model, _ = hf
    ids = real.tokenizer.encode(topics.topics["assignment"])[:600]
    assert len(ids) == 600
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    logits = real.model.forward(torch.tensor(ids), 0, real.model.new_cache(len(ids)))
    assert (logits - expected).abs().max().item() < 1e-3


@pytest.mark.realmodel
def test_real_greedy_continuation_matches_transformers(hf, real):
    model, tokenizer = hf
    ids = tokenizer(PROMPT)["input_ids"]
    assert ids == real.tokenizer.encode(PROMPT)
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    got = list(generate(real.model, ids, SamplingSettings(max_tokens=12, stop_at_eos=False)))
    assert got == expected
    assert real.tokenizer.decode(got) == CONTINUATION


@pytest.mark.realmodel
def test_real_tokenizer_matches_transformers(hf, real):
    from tests.test_real_smollm2 import varied_lines

    _, tokenizer = hf
    lines = varied_lines() + ["Bonjour, ça va ? À bientôt, élève naïve !", "a  b   c    d", "  two leading",
                              "<start_of_turn>user\nhi<end_of_turn>\n", "<b>bold</b> [multimodal]", "\n\n\n\nx"]
    encoded = [real.tokenizer.encode(line) for line in lines]
    assert [e for e, line in zip(encoded, lines) if e != tokenizer(line)["input_ids"]] == []
    assert [line for e, line in zip(encoded, lines) if real.tokenizer.decode(e) != tokenizer.decode(e)] == []
    assert real.tokenizer.eos_token_ids == [1, 106]  # <eos>, and <end_of_turn> as llama.cpp stops there


@pytest.mark.realmodel
def test_real_threshold_sparsity_keeps_half_the_neurons(gemma3_bundle):
    """At 50% (thresholds from a little of the built-in corpus) about half the neurons stay, and the
    greedy text starts as dense's (the prompt's prefill keeps every neuron). Measured on 1024 held-out
    tokens, perplexity rises 9% (20.61 -> 22.46): GeGLU is less sparse than SwiGLU at the same share."""
    from flashllm.corpus import load_corpus
    from flashllm.sparsity.reference import SparseCounts
    from flashllm.sparsity.thresholds import calibrate_thresholds

    loaded = load_dense(gemma3_bundle)
    model, tokenizer = loaded.model, loaded.tokenizer
    corpus, encode = load_corpus(None), lambda s: tokenizer.encode(s, add_bos=False)
    ids = corpus.tokens("train", encode, 256)
    thresholds = calibrate_thresholds(model, [torch.tensor(ids[:128]), torch.tensor(ids[128:256])], [0.5])[0.5]
    counts, heldout = SparseCounts(), torch.tensor(corpus.tokens("heldout", encode, 128))
    sparse_model = model.with_ffn(sparse_ffn(model, thresholds, None, counts))
    sparse_model.forward(heldout, 0, model.new_cache(len(heldout)))  # every position scored: all sparse
    assert 0.35 < counts.to_json()["true_active"] < 0.65
    prompt, settings = tokenizer.encode(PROMPT), SamplingSettings(max_tokens=6, stop_at_eos=False)
    dense = list(generate(model, prompt, settings))
    sparse = list(generate(model.with_ffn(sparse_ffn(model, thresholds)), prompt, settings))
    assert tokenizer.decode(dense) == CONTINUATION[:len(tokenizer.decode(dense))]
    assert sparse[:3] == dense[:3] and sparse != dense  # " the capital of" the United Kingdom, at 50%


@pytest.mark.realmodel
def test_real_predictors_and_budgeted_generation(gemma3_bundle, tmp_path):
    """int4 predictors trained on a little text, then generation under a budget that holds them."""
    import os
    import shutil

    from flashllm.sparsity.train import train_predictors
    from flashllm.tokenizer import Tokenizer

    bundle = tmp_path / "gemma3"
    shutil.copytree(gemma3_bundle, bundle, copy_function=os.link)  # the shared bundle stays without predictors
    result = train_predictors(bundle, tokens=512, eval_tokens=0, context=128, epochs=1, sparsity=0.5)
    overall = result.report["overall"]
    assert abs(overall["true_active"] - 0.5) < 0.1 and overall["recall"] > 0.9
    flash = FlashModel.open(bundle, "100%", FlashSettings(mode="predictor"), max_tokens=32, prefill_tokens=8)
    assert flash.mode == "predictor" and flash.plan.planned_bytes <= flash.plan.budget_bytes
    prompt = Tokenizer.from_folder(bundle).encode(PROMPT)
    assert len(list(flash.generate(prompt, SamplingSettings(max_tokens=6, stop_at_eos=False)))) == 6
    flash.close()


@pytest.mark.realmodel
def test_real_cli_generate_under_budget(gemma3_bundle):
    """The tied 262k-token embedding (the LM head, 168 MB as int8) stays resident: 70% of the bundle is
    below the minimum, 90% holds a third of the FFN in the neuron caches."""
    import json

    from typer.testing import CliRunner

    from flashllm.cli import app

    runner = CliRunner()
    low = runner.invoke(app, ["generate", str(gemma3_bundle), PROMPT, "-n", "4", "--dram-budget", "70%"])
    assert low.exit_code != 0 and "below the minimum" in low.output
    result = runner.invoke(app, ["generate", str(gemma3_bundle), PROMPT, "-n", "12", "--dram-budget", "90%",
                                 "--stats", "json"])
    assert result.exit_code == 0, result.output
    # the last word is a near tie ("largest" or "capital") that the order of the FFN's sum can turn
    assert result.stdout.strip().startswith("the capital of the country of France. It is the")
    stats = json.loads(result.stderr.strip().splitlines()[-1])
    assert stats["planned_bytes"] <= stats["budget_bytes"] and 0.2 < stats["cache_share"] < 0.5
