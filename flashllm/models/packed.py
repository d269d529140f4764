"""Slots of neuron rows kept in the layouts of torch's CPU weight-only kernels, written row by row.

`_weight_int4pack_mm_for_cpu` computes x @ W.T straight from 4-bit codes (7.6 G weights/s on this
machine's 2 cores against ~0.9 G for expanding our rows to float32 and multiplying). Its converter packs
a whole matrix at once; a neuron cache changes a few rows at a time, so this module writes the kernel's
layout itself: rows in blocks of B, block b a [k, B/2] byte matrix whose byte [j, d] holds row B*b + d
in its low nibble and row B*b + d + B/2 in its high one (column j of both). B is found by a probe against
the converter when first used (32 with AVX2, the only layout seen so far); a torch whose layout differs
is detected and the engine keeps computing on expanded rows (`available()` is False).

Scales and zeros are bfloat16 (the kernel computes (q - 8) * s + z, so z = min + 8 * s), the same
rounding the resident int4 matrices take (flashllm.models.qrows.to_int4_kernel).

Down columns (int8, a scale per 32 values) go to `Int8Columns`: kept transposed, [d, slots], so that
`_weight_int8pack_mm` (one scale per output row) sums them over every slot 32 output values at a time:
the 32 rows of a group share each slot's scale, which is folded into the coefficients (exact, no
requantization; 4 ms for Qwen's 8,960 x 1,536 against 8 ms expanding the rows to float32).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from flashllm.models.qrows import GROUP, QRows, Workspace, unpack_int4
from flashllm.models.quant import kernel_available

PAD_ROWS = 64  # slots are allocated in multiples of this (the kernel wants N % 16 == 0; 64 covers any B seen)
_SCATTER_ROWS = 64  # rows per chunk of a scattered write: its index temporaries stay under 1 MB


def _pack_nibbles(codes: np.ndarray, block: int, out: np.ndarray) -> None:
    """Plain-nibble rows [n, k/2] (n a multiple of `block`) into `out` [n / block, k, block / 2], without
    unpacking: column 2m of a row is the low nibble of its byte m, column 2m + 1 the high one. The bytes
    are combined in the rows' own order (contiguous), then transposed in one copy (torch's: 2x numpy's)."""
    n, half = codes.shape
    rows = torch.from_numpy(codes).view(n // block, 2, block // 2, half)
    low, high = rows[:, 0], rows[:, 1]  # [blocks, B/2, k/2]: rows d and d + B/2 of each block
    pairs = torch.stack(((low & 0x0F) | ((high & 0x0F) << 4), (low >> 4) | (high & 0xF0)), -1)  # [.., k/2, 2]
    columns = pairs.view(n // block, block // 2, 2 * half).transpose(1, 2)  # [blocks, k, B/2]
    torch.from_numpy(out).view(n // block, 2 * half, block // 2).copy_(columns)


@functools.cache
def block_rows() -> int | None:
    """The kernel's row block B on this machine, or None when its layout is not the one written here."""
    if not kernel_available():
        return None
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (128, 64), generator=g, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1).view(torch.uint8).reshape(-1).numpy()
    plain = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).numpy()  # our plain-nibble rows
    for block in (32, 64):  # the very function that writes the stores, against torch's converter
        ours = np.empty((128 // block, 64, block // 2), dtype=np.uint8)
        _pack_nibbles(plain, block, ours)
        if np.array_equal(ours.reshape(-1), packed):
            return block
    return None


def available() -> bool:
    return block_rows() is not None


def row_bytes(k: int) -> int:
    """DRAM per slot: k/2 code bytes and a bfloat16 scale and zero per group of 32."""
    return k // 2 + (k // GROUP) * 4


def slots_for(capacity: int) -> int:
    return -(-capacity // PAD_ROWS) * PAD_ROWS


def capacity_within(capacity: int, slot_bytes: int, store_row_bytes: int) -> int:
    """The most slots c <= capacity whose bytes, with the stores' padding to PAD_ROWS, stay within what
    `capacity` slots of `slot_bytes` were planned to take (the padding comes out of the cache itself)."""
    c = capacity
    while c > 0 and c * slot_bytes + (slots_for(c) - c) * store_row_bytes > capacity * slot_bytes:
        c -= 1
    return c


class PackedInt4:
    """`capacity` slots (rounded up to PAD_ROWS) of int4 rows of k values in the kernel's layout."""

    def __init__(self, capacity: int, k: int):
        self.block = block_rows()
        if self.block is None:
            raise RuntimeError("torch's int4 kernel layout is not available here")
        self.k, self.slots = k, slots_for(capacity)
        self.codes = torch.zeros(self.slots // self.block, k, self.block // 2, dtype=torch.uint8)
        self.scales_zeros = torch.zeros(k // GROUP, self.slots, 2, dtype=torch.bfloat16)
        self._flat = self.codes.view(-1).numpy()  # the same memory: numpy's fancy indexing is ~10x torch's here
        self._columns = np.arange(k, dtype=np.int64) * (self.block // 2)

    @staticmethod
    def bytes_for(capacity: int, k: int) -> int:
        return slots_for(capacity) * row_bytes(k)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales_zeros.nbytes

    def write(self, start: int, q: QRows) -> None:
        """Rows q into slots [start, start + q.n): whole blocks packed at once, the edges row by row."""
        n, B = q.n, self.block
        codes = q.codes.numpy()
        first = min(n, -start % B)  # rows before the first block boundary
        whole = (n - first) // B * B
        if whole:
            b = (start + first) // B
            _pack_nibbles(codes[first:first + whole], B, self.codes.numpy()[b:b + whole // B])
        edges = np.r_[0:first, first + whole:n]
        if len(edges):
            self._scatter(edges + start, unpack_int4(q.codes[torch.from_numpy(edges)]).numpy())
        scale, low = q.scales.float(), q.mins.float()  # [n, G]
        self.scales_zeros[:, start:start + n, 0] = scale.T
        self.scales_zeros[:, start:start + n, 1] = (low + 8 * scale).T

    def move(self, dst: np.ndarray, src: np.ndarray) -> None:
        """Copy the rows in slots `src` to slots `dst` (the cache's swap-delete)."""
        if len(dst) == 0:
            return
        for i in range(0, len(dst), _SCATTER_ROWS):
            index, shift = self._index(src[i:i + _SCATTER_ROWS])
            self._scatter(dst[i:i + _SCATTER_ROWS], (self._flat[index] >> shift) & 0x0F)
        self.scales_zeros[:, torch.from_numpy(dst)] = self.scales_zeros[:, torch.from_numpy(src)]

    def matmul(self, x: torch.Tensor, used: int) -> torch.Tensor:
        """x [T, k] -> x @ W.T [T, used] float32 over the first `used` slots (computed in bfloat16)."""
        xb = x.to(torch.bfloat16).contiguous()
        packed = self.codes.view(self.slots, self.k // 2)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, GROUP, self.scales_zeros)
        return y[:, :used].float()

    def _index(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat byte positions [n, k] of these slots' codes, and the shift [n, 1] of their nibble."""
        B = self.block
        base = slots // B * (self.k * B // 2) + slots % (B // 2)
        shift = (slots % B >= B // 2).astype(np.uint8) * 4
        return base[:, None] + self._columns, shift[:, None]

    def _scatter(self, slots: np.ndarray, values: np.ndarray) -> None:
        """values [n, k] codes into these slots. Rows d and d + B/2 of a block share their bytes, so the
        low-nibble rows and the high-nibble rows go in separate passes (one pass would lose a nibble)."""
        high = slots % self.block >= self.block // 2
        for part in (~high, high):
            chosen, rows = slots[part], values[part]
            for i in range(0, len(chosen), _SCATTER_ROWS):
                index, shift = self._index(chosen[i:i + _SCATTER_ROWS])
                kept = self._flat[index] & (0xF0 >> shift)  # the other row's nibble
                self._flat[index] = kept | (rows[i:i + _SCATTER_ROWS] << shift)


KERNEL_TOKENS = 16  # up to this many tokens a pass the int8 kernel sums the down columns; more: expanded


class Int8Columns:
    """`capacity` slots (rounded up to PAD_ROWS) of int8 columns of d values (a float16 scale per 32),
    kept transposed: codes [d, slots], scales [d / 32, slots]. The FFN's down sum over the slots,
    a @ W [T, d], is one `_weight_int8pack_mm` call per group of 32 output values, each on the group's
    contiguous [32, slots] codes with the coefficients times that group's scales (computed in bfloat16);
    passes of more than KERNEL_TOKENS tokens expand a block of slots to float32 at a time instead."""

    def __init__(self, capacity: int, d: int):
        self.d, self.slots = d, slots_for(capacity)
        self.codes = torch.zeros(d, self.slots, dtype=torch.int8)
        self.scales = torch.zeros(d // GROUP, self.slots, dtype=torch.float16)
        self._ones = torch.ones(GROUP, dtype=torch.bfloat16)

    @staticmethod
    def column_bytes(d: int) -> int:
        return d + (d // GROUP) * 2

    @staticmethod
    def bytes_for(capacity: int, d: int) -> int:
        return slots_for(capacity) * Int8Columns.column_bytes(d)

    @staticmethod
    def work_bytes(capacity: int, d: int, tokens: int) -> int:
        """A pass's temporaries: the coefficients padded to the slots, times a group's scales (float32,
        then bfloat16; a single token's times every group's at once), and the groups' outputs."""
        one = slots_for(capacity) * (4 + (d // GROUP) * 6)  # a single token: every group folded at once
        return max(one, min(tokens, KERNEL_TOKENS) * slots_for(capacity) * 10) + tokens * d * 8

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    def write(self, start: int, q: QRows) -> None:
        """int8 rows q (one per neuron: its down column) into slots [start, start + q.n)."""
        self.codes[:, start:start + q.n] = q.codes.T
        self.scales[:, start:start + q.n] = q.scales.T

    def move(self, dst: np.ndarray, src: np.ndarray) -> None:
        """Copy the columns in slots `src` to slots `dst` (the cache's swap-delete)."""
        if len(dst) == 0:
            return
        d, s = torch.from_numpy(dst), torch.from_numpy(src)
        self.codes[:, d] = self.codes[:, s]
        self.scales[:, d] = self.scales[:, s]

    def combine(self, a: torch.Tensor, work: Workspace | None = None) -> torch.Tensor:
        """a [T, n] (coefficients of the first n slots) -> a @ W [T, d] float32."""
        T, n = a.shape
        if n == 0:
            return torch.zeros(T, self.d)
        if T > KERNEL_TOKENS:
            return self._expanded(a.float(), work)
        padded = torch.zeros(T, self.slots)
        padded[:, :n] = a
        kernel, scales, groups = torch.ops.aten._weight_int8pack_mm, self.scales, self.d // GROUP
        if T == 1:  # every group's coefficients in one multiply (1.3x faster than a group at a time)
            folded = torch.mul(padded, scales).to(torch.bfloat16).view(groups, 1, self.slots)
            parts = [kernel(folded[g], self.codes[g * GROUP:(g + 1) * GROUP], self._ones) for g in range(groups)]
        else:
            parts = [kernel(torch.mul(padded, scales[g]).to(torch.bfloat16), self.codes[g * GROUP:(g + 1) * GROUP],
                            self._ones) for g in range(groups)]
        return torch.cat(parts, 1).float()

    def _expanded(self, a: torch.Tensor, work: Workspace | None, block: int = 1024) -> torch.Tensor:
        """The same sum for many tokens: a block of slots expanded to float32 [d, block] at a time."""
        T, n = a.shape
        y = torch.zeros(self.d, T).T
        groups = self.d // GROUP
        for start in range(0, n, block):
            stop = min(start + block, n)
            width = stop - start
            if work is not None and work.floats.numel() >= self.d * width:
                w = work.floats[:self.d * width].view(self.d, width)
            else:
                w = torch.empty(self.d, width)
            w.copy_(self.codes[:, start:stop])
            w.view(groups, GROUP, width).mul_(self.scales[:, start:stop].unsqueeze(1))
            y.T.addmm_(w, a[:, start:stop].T)  # [d, T]: 1.5x faster than a @ w.T here
        return y
