"""Neuron caches in torch's int4 kernel layout (flashllm.models.packed): rows written at any slot, moved
by the cache's evictions, compute exactly what the kernel computes on the converter's own packing."""

import numpy as np
import pytest
import torch

from flashllm.engine.cache import NeuronCache
from flashllm.models import packed
from flashllm.models.packed import Int8Columns, PackedInt4
from flashllm.models.qrows import QRows, dequantize_rows, quantize_rows, to_int4_kernel
from flashllm.models.quant import kernel_available

# skipped only where torch lacks the kernel: a writer that no longer matches torch's converter makes the
# probe fail (the engine then falls back to expanded rows), which these tests must report, not skip
pytestmark = pytest.mark.skipif(not kernel_available(), reason="this torch has no CPU int4 kernel")


def reference(q: QRows, x: torch.Tensor) -> torch.Tensor:
    """The kernel on torch's own converter's packing of the same rows (bfloat16 scales and zeros alike)."""
    return to_int4_kernel(q).matmul(x)


def test_the_probe_finds_the_layout():
    """The probe compares the function that writes the stores with torch's own converter."""
    assert packed.block_rows() in (32, 64)


@pytest.mark.parametrize("cuts", [[200], [37, 150, 200], [1, 2, 3, 70, 131, 200], [64, 128, 200]])
def test_writes_at_any_offset_equal_the_converter(cuts):
    torch.manual_seed(0)
    q = quantize_rows(torch.randn(200, 128), "int4")
    store = PackedInt4(200, 128)
    start = 0
    for stop in cuts:  # pieces that start and end inside a block of rows, or on its edges
        store.write(start, q[start:stop])
        start = stop
    x = torch.randn(3, 128)
    assert torch.equal(store.matmul(x, 200), reference(q, x))
    assert store.nbytes == PackedInt4.bytes_for(200, 128) == 256 * packed.row_bytes(128)


def test_a_row_shares_its_bytes_with_another_and_neither_is_lost():
    """Rows d and d + B/2 of a block live in the two nibbles of the same bytes: writing one keeps the other."""
    torch.manual_seed(1)
    q = quantize_rows(torch.randn(64, 64), "int4")
    store = PackedInt4(64, 64)
    store.write(0, q)
    fresh = quantize_rows(torch.randn(1, 64), "int4")
    store.write(5, fresh)  # one row, the low nibbles of its bytes
    expected = QRows("int4", q.codes.clone(), q.scales.clone(), q.mins.clone())
    expected.codes[5], expected.scales[5], expected.mins[5] = fresh.codes[0], fresh.scales[0], fresh.mins[0]
    x = torch.randn(1, 64)
    assert torch.equal(store.matmul(x, 64), reference(expected, x))


def cache_steps(cache: NeuronCache, store, q: QRows, rng: np.random.Generator, steps: int):
    """Random needed sets through a cache with `store` as its companion, the rows of what it admits
    written into the store; yields the number of used slots after each step."""
    cache.companions = [store]
    n = cache.n_neurons
    for _ in range(steps):
        needed = np.unique(rng.choice(n, size=rng.integers(1, 80), replace=False))
        _, missing = cache.lookup(needed)
        insert = cache.admit(missing)
        store.write(cache.num_used, q[torch.from_numpy(insert)] if len(insert) else q[0:0])
        cache.commit(insert)
        cache.check()
        yield cache.num_used


def test_the_store_follows_the_cache_through_evictions():
    """A cache with a store as companion: after every step, slot s of the store holds neuron pointer[s]."""
    rng = np.random.default_rng(0)
    torch.manual_seed(2)
    n, k = 300, 64
    q = quantize_rows(torch.randn(n, k), "int4")
    for policy in ("lru", "window", "pinned"):
        cache = NeuronCache(n, 90, 1, policy=policy)
        store = PackedInt4(90, k)
        x = torch.randn(2, k)
        for used in cache_steps(cache, store, q, rng, 40):
            rows = torch.from_numpy(cache.pointer[:used])
            held = QRows("int4", q.codes[rows], q.scales[rows], q.mins[rows])
            assert torch.equal(store.matmul(x, used), reference(held, x)), policy


@pytest.mark.parametrize("tokens", [1, 2, packed.KERNEL_TOKENS + 1])
def test_down_columns_follow_the_cache_and_sum_like_the_rows(tokens):
    """Int8 down columns kept transposed for the int8 kernel: after every step of a cache (with evictions),
    the sum over the used slots equals the expanded rows of the neurons the cache holds, within the
    kernel's bfloat16 (passes of few tokens) or exactly (long passes, expanded); unused slots add nothing."""
    rng = np.random.default_rng(tokens)
    torch.manual_seed(tokens)
    n, d = 300, 96
    q = quantize_rows(torch.randn(n, d) * 0.05, "int8")
    w = dequantize_rows(q)
    for policy in ("lru", "window"):
        cache = NeuronCache(n, 90, 0, policy=policy)
        store = Int8Columns(90, d)
        for used in cache_steps(cache, store, q, rng, 25):
            a = torch.randn(tokens, used)
            reference = a @ w[torch.from_numpy(cache.pointer[:used])]
            tolerance = 1e-5 if tokens > packed.KERNEL_TOKENS else 1e-2
            assert float((store.combine(a) - reference).abs().max()) <= tolerance * float(reference.abs().max()), policy
    assert store.nbytes == Int8Columns.bytes_for(90, d) == 128 * Int8Columns.column_bytes(d)
