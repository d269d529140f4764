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
