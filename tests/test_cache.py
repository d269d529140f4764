"""NeuronCache: randomized insert/evict keeps pointer, slot map and matrix rows consistent."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashllm.engine.cache import NeuronCache

N, RECORD = 64, 8


def record_of(ids):
    """A record whose bytes say which neuron it belongs to."""
    return np.repeat(np.asarray(ids, dtype=np.uint8)[:, None], RECORD, axis=1)


def run_step(cache, needed):
    needed = np.unique(np.asarray(needed, dtype=np.int64))
    hits, missing = cache.lookup(needed)
    insert = cache.admit(missing)
    cache.free_rows(len(insert))[:] = record_of(insert)
    cache.commit(insert)
    return hits, missing, insert


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(0, 40), policy=st.sampled_from(["lru", "window", "pinned", "static"]), window=st.integers(1, 5),
       steps=st.lists(st.lists(st.integers(0, N - 1), max_size=30), min_size=1, max_size=25))
def test_random_steps_keep_cache_consistent(capacity, policy, window, steps):
    cache = NeuronCache(N, capacity, RECORD, policy=policy, window=window)
    for needed in steps:
        hits, missing, insert = run_step(cache, needed)
        cache.check()
        used = cache.pointer[:cache.num_used]
        assert (cache.matrix[:cache.num_used] == record_of(used)).all()  # rows moved with their neurons
        assert cache.num_used <= capacity
        assert set(hits) | set(missing) == set(needed)
        assert set(insert) <= set(used)
        # what was needed this step and fits is cached: hits are never evicted for this step's misses
        assert set(hits) <= set(used)


def test_lru_evicts_least_recently_needed():
    cache = NeuronCache(N, 3, RECORD, policy="lru")
    for needed in ([1], [2], [3], [1], [4]):  # 2 is the least recently needed when 4 arrives
        run_step(cache, needed)
    assert sorted(cache.pointer[:cache.num_used]) == [1, 3, 4]


def test_window_drops_neurons_that_left_the_window():
    cache = NeuronCache(N, 10, RECORD, policy="window", window=2)
    for needed in ([1, 2], [3], [4]):
        run_step(cache, needed)
    assert sorted(cache.pointer[:cache.num_used]) == [3, 4]


def test_pinned_keeps_hot_neurons():
    cache = NeuronCache(N, 4, RECORD, policy="pinned", pin_fraction=0.5)
    for _ in range(5):
        run_step(cache, [7])
    for needed in ([1], [2], [3], [4], [5], [6]):
        run_step(cache, needed)
    assert 7 in cache.pointer[:cache.num_used]


def test_overflow_when_needed_exceeds_capacity():
    cache = NeuronCache(N, 4, RECORD)
    hits, missing, insert = run_step(cache, range(10))
    assert len(insert) == 4 and len(missing) == 10


def test_static_never_evicts():
    cache = NeuronCache(N, 3, RECORD, policy="static")
    for needed in ([1, 2, 3], [4, 5], [6]):
        run_step(cache, needed)
    assert sorted(cache.pointer[:cache.num_used]) == [1, 2, 3]


def test_unknown_policy():
    with pytest.raises(ValueError, match="policy"):
        NeuronCache(N, 4, RECORD, policy="fifo")


def test_belady_is_a_lower_bound_of_every_policy():
    from flashllm.engine.cache import belady, replay

    rng = np.random.default_rng(0)
    hot = rng.choice(N, 12, replace=False)
    trace = [np.unique(np.concatenate([rng.choice(hot, 6), rng.choice(N, 8)])) for _ in range(60)]
    for capacity in (0, 5, 16, 40):
        best = belady(trace, capacity, N)
        for policy in ("lru", "window", "pinned", "static"):
            assert best <= replay(trace, capacity, N, policy)
    assert belady(trace, N, N) == len(np.unique(np.concatenate(trace)))  # everything fits: compulsory misses
    assert belady(trace, 0, N) == sum(len(t) for t in trace)
