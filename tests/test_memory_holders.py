"""A part reports its own bytes: for every holder the planner adds up, what it allocates equals what it
reported (or, for buffers that grow on demand, never exceeds the bound it reported)."""

import numpy as np
import pytest
import torch

from flashllm.bundle.writer import convert
from flashllm.disk.reader import FlashReader, RecordRegion
from flashllm.engine.cache import NeuronCache
from flashllm.engine.flash_ffn import FlashEmbedding, FlashFFN
from flashllm.engine.flash_model import FlashModel, FlashSettings
from flashllm.engine.generate import SamplingSettings
from flashllm.models.layers import KVCache, Rotary
from flashllm.sparsity.predictors import load_predictors
from flashllm.sparsity.train import train_predictors
from tests.tiny import tiny_llama, tiny_tokenizer

BIG = 10**10


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny untied gated model with int4 predictors."""
    root = tmp_path_factory.mktemp("holders")
    source = tiny_llama(root / "src", vocab_size=300)
    tiny_tokenizer(source, 300)
    out = root / "bundle"
    convert(source, out, dtype="float32")
    train_predictors(out, tokens=1500, eval_tokens=0, context=64, sparsity=0.5)
    return out


@pytest.mark.parametrize("capacity", [0, 1, 37, 160])
def test_neuron_cache(capacity):
    cache = NeuronCache(160, capacity, 3 * 64 * 4)
    assert cache.nbytes == NeuronCache.bytes_for(160, capacity, 3 * 64 * 4)


def test_quantized_workspace():
    from flashllm.models.qrows import Workspace

    for k, rows in ((576, 1024), (96, 32)):
        assert Workspace(k, rows).nbytes == Workspace.bytes_for(k, rows)


def test_kv_cache_and_rotary():
    for dtype, itemsize in ((torch.float32, 4), (torch.float16, 2)):
        assert KVCache(3, 17, 2, 16, dtype).nbytes == KVCache.bytes_for(3, 17, 2, 16, itemsize)
    assert Rotary(16, 1e4, 33).nbytes == Rotary.bytes_for(16, 33)


def test_predictors_report_what_they_hold(bundle):
    predictors = load_predictors(bundle)
    held = 0
    for p in predictors.layers:
        tensors = [p.matrix.packed if p.matrix.packed is not None else p.matrix.codes, p.matrix.scales_zeros]
        held += sum(t.numel() * t.element_size() for t in tensors)
    assert predictors.nbytes == held > 0


def test_reader_staging_stays_within_its_bound(tmp_path):
    path = tmp_path / "records.bin"
    stride, count = 3000, 4000
    path.write_bytes(np.random.default_rng(0).integers(0, 255, stride * count, dtype=np.uint8).tobytes())
    reader = FlashReader(threads=4, max_request_bytes=128 * 1024, chunk_bytes=128 * 1024, direct=False)
    region = RecordRegion(path, 0, stride, count)
    for ids in (np.arange(count), np.arange(0, count, 3), np.array([5, 7, 3999])):
        out = np.empty((len(ids), stride), dtype=np.uint8)
        reader.read(region, ids, out)
        assert 0 < reader.staging_bytes <= reader.staging_bound
    reader.close()


def test_flash_model_holders_match_the_plan(bundle):
    flash = FlashModel.open(bundle, BIG, FlashSettings(mode="predictor"), max_tokens=32, prefill_tokens=16)
    parts, c = flash.plan.parts, flash.bundle.config
    # resident weights: what the model holds, plus the embedding rows of the longest pass it reads
    assert flash.embedding is not None and "embed.weight" not in flash.model.weights
    held = sum(t.numel() * t.element_size() for t in flash.model.weights.values())
    assert held + FlashEmbedding.bytes_for(flash.embedding.region, 16) == parts["resident weights"]
    assert parts["predictors"] == flash.predictors.nbytes
    assert parts["KV cache"] == flash.model.new_cache(32).nbytes
    assert flash.model.rotary.nbytes == Rotary.bytes_for(c.head_dim, 32)
    assert parts["reader staging"] == flash.reader.staging_bound
    assert parts["quantized work"] == 0 and flash.workspace is None  # a float bundle expands nothing
    assert flash.gate_up == "flash"  # requantized predictors of a float bundle only choose what is read
    caches = sum(cache.nbytes for cache in flash.caches)
    assert caches == flash.plan.cache_bytes + parts["cache index"]
    assert flash.ffn.nbytes == 2 * flash.ffn.chunk * flash.plan.record_bytes <= parts["FFN work"]
    assert parts["FFN work"] == FlashFFN.work_bytes_for(flash.spec, flash.plan.record_bytes, 16, quantized=False)
    list(flash.generate(list(range(1, 17)), SamplingSettings(max_tokens=8, stop_at_eos=False)))
    assert flash.reader.staging_bytes <= parts["reader staging"]
    assert sum(cache.nbytes for cache in flash.caches) == caches  # nothing grows while generating
