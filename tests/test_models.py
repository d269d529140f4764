"""Our forward pass against transformers on tiny random models, and the KV cache against recompute."""

import pytest
import torch

from flashllm.engine.generate import load_dense
from tests.tiny import hf_logits, tiny_llama, tiny_opt

IDS = [5, 17, 3, 88, 41, 2, 60, 60, 9, 33, 71, 12, 0, 95]


@pytest.fixture(params=["llama", "llama-tied", "qwen2", "opt"])
def tiny(request, tmp_path):
    folder = tmp_path / request.param
    if request.param == "opt":
        return tiny_opt(folder)
    return tiny_llama(folder, kind=request.param)


def test_logits_match_transformers(tiny):
    ours = load_dense(tiny).model
    logits = ours.forward(torch.tensor(IDS), 0, ours.new_cache(len(IDS)))
    expected = hf_logits(tiny, IDS)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() < 1e-4


def test_kv_cache_decode_equals_recompute(tiny):
    model = load_dense(tiny).model
    full = model.forward(torch.tensor(IDS), 0, model.new_cache(len(IDS)))
    cache = model.new_cache(len(IDS))
    prefix = 5
    step_logits = [model.forward(torch.tensor(IDS[:prefix]), 0, cache)]
    for pos in range(prefix, len(IDS)):  # one token at a time through the cache
        step_logits.append(model.forward(torch.tensor([IDS[pos]]), pos, cache))
    assert (torch.cat(step_logits) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("max_pass", [1, 4, 5, 13])
def test_prefill_in_passes_equals_one_pass(tiny, max_pass):
    model = load_dense(tiny).model
    whole = model.forward(torch.tensor(IDS), 0, model.new_cache(len(IDS)), last_only=True)
    model.limit_pass(max_pass)
    cache = model.new_cache(len(IDS) + 1)
    passes = model.forward(torch.tensor(IDS), 0, cache, last_only=True)
    assert passes.shape == whole.shape == (1, whole.shape[1])
    assert (passes - whole).abs().max().item() < 1e-5
    # the cache holds every prompt position: the next token decodes as after one pass
    after = model.forward(torch.tensor([7]), len(IDS), cache)
    model.limit_pass(len(IDS))
    reference = model.new_cache(len(IDS) + 1)
    model.forward(torch.tensor(IDS), 0, reference, last_only=True)
    assert (after - model.forward(torch.tensor([7]), len(IDS), reference)).abs().max().item() < 1e-5


def test_qwen2_biases_are_used(tmp_path):
    folder = tiny_llama(tmp_path / "q", kind="qwen2")
    model = load_dense(folder).model
    assert "layers.0.attn.q.bias" in model.weights and "layers.0.attn.o.bias" not in model.weights
