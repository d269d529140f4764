"""The real SmolLM2-135M GGUF against transformers' own GGUF loader: logits, greedy text, tokens."""

import inspect
import json

import pytest
import torch

from flashllm.engine.generate import SamplingSettings, generate, load_dense
from flashllm.sources import open_source

pytestmark = pytest.mark.realmodel

TEXT = ("The Python standard library is very extensive, offering a wide range of facilities as indicated by "
        "the long table of contents listed below. The library contains built-in modules (written in C) that "
        "provide access to system functionality such as file I/O that would otherwise be inaccessible to "
        "Python programmers, as well as modules written in Python.")


@pytest.fixture(scope="module")
def hf(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return load_dense(smollm2_gguf)


def test_logits_match_transformers(hf, ours):
    model, tokenizer = hf
    ids = tokenizer(TEXT)["input_ids"][:64]
    assert len(ids) == 64
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    logits = ours.model.forward(torch.tensor(ids), 0, ours.model.new_cache(64))
    assert (logits - expected).abs().max().item() < 1e-3


def test_greedy_continuation_matches_transformers(hf, ours):
    model, tokenizer = hf
    ids = tokenizer("The capital of France is")["input_ids"]
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    got = list(generate(ours.model, ids, SamplingSettings(max_tokens=32, stop_at_eos=False)))
    assert got == expected
    assert "Paris" in ours.tokenizer.decode(got)


def varied_lines() -> list[str]:
    """A few hundred lines: prose, code, unicode, whitespace runs, digits, special tokens."""
    import pydoc_data.topics as topics
    import json as json_module
    import textwrap

    prose = [line for line in topics.topics["assignment"].splitlines() if line.strip()][:80]
    code = inspect.getsource(textwrap).splitlines()[:80] + inspect.getsource(json_module.decoder).splitlines()[:60]
    unicode = ["naïve café déjà vu", "日本語のテキストです。", "emoji 🎉👍🏽 and ❤️", "Ελληνικά γράμματα", "Привет, мир!",
               "مرحبا بالعالم", "e\u0301 combining", "中文，标点。", "tab\tsep\tvalues", "ß ẞ ﬁ ligature", "😀" * 5]
    spaces = ["a    b", "\t\tindented", "\n\n\nnewlines", "  leading", "trailing   ", " ", "    ", "x \n y",
              "\r\nwindows\r\n", "mixed \t \n\t end"]
    digits = ["1234567890", "3.14159265", "1,000,000", "v2.0.1", "0x1F3A", "2024-11-23T09:10:00Z", "phone 555-0199",
              "x=42; y=-17", "1e-10", "9" * 30]
    special = ["<|im_start|>user\nhello<|im_end|>", "<|endoftext|>", "text<|im_end|>more"]
    return prose + code + unicode + spaces + digits + special


def test_token_ids_match_transformers(hf, ours):
    _, tokenizer = hf
    lines = varied_lines()
    assert len(lines) >= 250
    mismatches = [line for line in lines
                  if ours.tokenizer.encode(line) != tokenizer(line, add_special_tokens=True)["input_ids"]]
    assert mismatches == []


def test_decode_encode_roundtrip(ours):
    for line in varied_lines():
        assert ours.tokenizer.decode(ours.tokenizer.encode(line)) == line


def test_config_from_gguf(smollm2_gguf):
    config = open_source(smollm2_gguf).config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.rope_theta) == (9, 3, 100000.0)
    assert config.tie_word_embeddings
    json.dumps(config.to_dict())


def test_bundle_logits_bit_identical_to_gguf(smollm2_gguf, smollm2_bundle):
    ids = list(range(100, 140))
    results = []
    for path in (smollm2_gguf, smollm2_bundle):
        model = load_dense(path, torch.float16).model
        results.append(model.forward(torch.tensor(ids), 0, model.new_cache(len(ids))))
    assert torch.equal(results[0], results[1])


def test_sparse_chat_answer_equals_dense(ours):
    """At 50% sparsity (thresholds calibrated on the built-in prose) the greedy chat answer equals dense's:
    the prompt's prefill keeps every neuron (sparsity/reference.py PROMPT_DENSE_NOTE). With the prompt
    sparse too this answer was "La femme de France, le grand-mère de"."""
    from flashllm.cli import _prompt_text
    from flashllm.corpus import load_corpus
    from flashllm.sparsity.reference import sparse_ffn
    from flashllm.sparsity.thresholds import calibrate_thresholds

    model, tokenizer = ours.model, ours.tokenizer
    ids = load_corpus(None).tokens("train", lambda s: tokenizer.encode(s, add_bos=False), 1024)
    sequences = [torch.tensor(ids[i:i + 256]) for i in range(0, 1024, 256)]
    thresholds = calibrate_thresholds(model, sequences, [0.5])[0.5]
    prompt = tokenizer.encode(_prompt_text(tokenizer, "What is the capital of France?", True, None))
    settings = SamplingSettings(max_tokens=12)
    dense = tokenizer.decode(list(generate(model, prompt, settings, tokenizer.eos_token_ids)))
    sparse_model = model.with_ffn(sparse_ffn(model, thresholds))
    sparse = tokenizer.decode(list(generate(sparse_model, prompt, settings, tokenizer.eos_token_ids)))
    assert "Paris" in dense and sparse == dense
