"""NeuronCache: one layer's neuron records held in DRAM, preallocated, updated in place.

As in the paper (docs/DESIGN.md §1): a matrix [capacity, record bytes], `pointer` (neuron id per slot) and
`num_used`. Insert appends at num_used; delete moves the last used rows into the holes (O(rows
deleted)); compute uses matrix[:num_used] directly. On gated models the union of a window of active
sets exceeds any useful capacity, so an eviction policy decides what stays:

- "lru": keep what fits; evict the least recently needed neurons only when room is needed.
- "window": the paper's rule: also drop neurons not needed in the last K tokens, then LRU.
- "pinned": the most frequently needed neurons (by a running count) are never evicted while they
  stay among the hottest `pin_fraction` of capacity; the rest is LRU.
- "static": first come, kept forever: the paper's hybrid baseline (part of the FFN resident).

`companions` are stores kept slot for slot with the matrix (an int4 kernel-form copy of the gate/up
rows, flashllm.models.packed): the swap-delete moves their rows too, and their bytes count as the cache's.
"""

from __future__ import annotations

import numpy as np

POLICIES = ("lru", "window", "pinned", "static")
NEVER = np.iinfo(np.int64).min // 2


class NeuronCache:
    """Slots of neuron records for one layer. The caller reads records into `free_rows(k)` and then
    calls `commit(ids)`; `admit` decides what to evict to make room."""

    def __init__(self, n_neurons: int, capacity: int, record_bytes: int, policy: str = "lru", window: int = 4,
                 pin_fraction: float = 0.5):
        if policy not in POLICIES:
            raise ValueError(f"unknown cache policy {policy!r} (choose from {', '.join(POLICIES)})")
        self.n_neurons, self.capacity, self.policy, self.window = n_neurons, capacity, policy, window
        self.matrix = np.zeros((capacity, record_bytes), dtype=np.uint8)  # [capacity, record bytes]
        self.pointer = np.full(capacity, -1, dtype=np.int64)  # neuron id per slot
        self.slot_of = np.full(n_neurons, -1, dtype=np.int64)  # slot per neuron id, -1 if absent
        self.last_used = np.full(capacity, NEVER, dtype=np.int64)  # step a slot's neuron was last needed
        self.frequency = np.zeros(n_neurons, dtype=np.int64)  # times each neuron was needed
        self.pin_count = int(capacity * pin_fraction) if policy == "pinned" else 0
        self.num_used = 0
        self.step = 0
        self.companions: list = []  # stores kept slot for slot with the matrix (flashllm.models.packed)

    @staticmethod
    def bytes_for(n_neurons: int, capacity: int, record_bytes: int) -> int:
        """DRAM this cache keeps: the matrix plus its bookkeeping arrays."""
        return capacity * (record_bytes + 16) + n_neurons * 16

    @property
    def nbytes(self) -> int:
        return self.matrix.nbytes + self.pointer.nbytes + self.last_used.nbytes + self.slot_of.nbytes + \
            self.frequency.nbytes + sum(c.nbytes for c in self.companions)

    def lookup(self, needed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Split sorted neuron ids into (cached, missing) and mark the cached ones as used now."""
        self.step += 1
        slots = self.slot_of[needed]
        hit = slots >= 0
        self.last_used[slots[hit]] = self.step
        self.frequency[needed] += 1
        return needed[hit], needed[~hit]

    def admit(self, missing: np.ndarray) -> np.ndarray:
        """Make room for as many missing neurons as the policy allows; returns the ids to insert now
        (the rest must be streamed past the cache). Evicted rows are gone on return."""
        if self.policy == "window":
            self._evict_slots(np.flatnonzero(self.last_used[:self.num_used] <= self.step - self.window))
        room = self.capacity - self.num_used
        if len(missing) > room and self.policy != "static":
            self._evict_for(len(missing) - room)
        return missing[:self.capacity - self.num_used]

    def free_rows(self, k: int) -> np.ndarray:
        """The next k free rows, to read records into: [k, record bytes]."""
        return self.matrix[self.num_used:self.num_used + k]

    def commit(self, ids: np.ndarray) -> None:
        """The records of `ids` are now in free_rows(len(ids)); make them cached."""
        k = len(ids)
        slots = np.arange(self.num_used, self.num_used + k)
        self.pointer[slots] = ids
        self.slot_of[ids] = slots
        self.last_used[slots] = self.step
        self.num_used += k

    def _evict_for(self, k: int) -> None:
        """Evict up to k neurons not needed at this step, least recently used first."""
        used = self.num_used
        score = self.last_used[:used].astype(np.float64)
        score[score >= self.step] = np.inf  # needed now: never evicted for this step's misses
        if self.pin_count:
            freq = self.frequency[self.pointer[:used]]
            if used > self.pin_count:
                hot = np.argpartition(-freq, self.pin_count - 1)[:self.pin_count]
                score[hot] = np.inf
        evictable = int(np.isfinite(score).sum())
        k = min(k, evictable)
        if k <= 0:
            return
        victims = np.argpartition(score, k - 1)[:k]
        self._evict_slots(victims)

    def _evict_slots(self, slots: np.ndarray) -> None:
        """Swap-delete: move the last used rows into the holes, O(rows deleted)."""
        k = len(slots)
        if k == 0:
            return
        new_used = self.num_used - k
        evicted = np.zeros(self.num_used, dtype=bool)
        evicted[slots] = True
        holes = np.flatnonzero(evicted[:new_used])  # holes that survivors must fill
        movers = new_used + np.flatnonzero(~evicted[new_used:])  # survivors beyond the new end
        self.slot_of[self.pointer[slots]] = -1
        if len(holes):
            self.matrix[holes] = self.matrix[movers]
            for companion in self.companions:
                companion.move(holes, movers)
            self.pointer[holes] = self.pointer[movers]
            self.last_used[holes] = self.last_used[movers]
            self.slot_of[self.pointer[holes]] = holes
        self.pointer[new_used:self.num_used] = -1
        self.last_used[new_used:self.num_used] = NEVER
        self.num_used = new_used

    def check(self) -> None:
        """Invariants (for tests): pointer and slot_of agree; unused slots are empty."""
        used = self.pointer[:self.num_used]
        assert (used >= 0).all() and len(np.unique(used)) == self.num_used
        assert (self.slot_of[used] == np.arange(self.num_used)).all()
        assert (self.slot_of >= 0).sum() == self.num_used
        assert (self.pointer[self.num_used:] == -1).all()


def replay(trace: list[np.ndarray], capacity: int, n_neurons: int, policy: str, window: int = 4) -> int:
    """Neurons read (misses) when a sequence of needed sets goes through a NeuronCache of this policy."""
    cache = NeuronCache(n_neurons, capacity, 1, policy=policy, window=window)
    misses = 0
    for needed in trace:
        _, missing = cache.lookup(needed)
        misses += len(missing)
        cache.commit(cache.admit(missing))
    return misses


def belady(trace: list[np.ndarray], capacity: int, n_neurons: int) -> int:
    """Misses of the offline optimum: after each step keep the `capacity` neurons needed soonest
    (Belady's rule, with neurons that do not fit streamed past the cache as the engine does)."""
    never = len(trace) + 1
    next_use = np.full(n_neurons, never, dtype=np.int64)
    upcoming = []  # next_use after step t, built backwards
    for t in range(len(trace) - 1, -1, -1):
        upcoming.append(next_use.copy())
        next_use[trace[t]] = t
    upcoming.reverse()
    cached = np.zeros(n_neurons, dtype=bool)
    misses = 0
    for t, needed in enumerate(trace):
        misses += int((~cached[needed]).sum())
        candidates = np.flatnonzero(cached | np.isin(np.arange(n_neurons), needed))
        if len(candidates) > capacity:
            soon = upcoming[t][candidates]
            candidates = candidates[np.argpartition(soon, capacity - 1)[:capacity]] if capacity else candidates[:0]
        cached[:] = False
        cached[candidates] = True
    return misses
