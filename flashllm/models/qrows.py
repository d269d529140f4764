"""Quantized weight rows, in groups of 32 values along each row, for DRAM caches and flash records.

Two kinds:
- int4: codes q in 0..15, two per byte as plain nibbles (value 2j in the low half of byte j, 2j + 1 in
  the high half), and per group a float16 scale and a float16 min: w = q * scale + min. GGUF's Q4_0,
  Q4_1 and Q4_K grids land on it without rounding the codes (sources/gguf_quant.py).
- int8: int8 codes and per group a float16 scale, symmetric: w = q * scale. Q8_0 and Q5_0 land on it
  exactly.

The record form keeps each row self-contained, [codes | scales (| mins)] back to back, so a neuron's
record carries its own scales inline and one read returns everything needed to compute on it. Nothing
here knows about files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashllm import native
from flashllm.errors import FlashLLMError
from flashllm.models.quant import _ROW_BLOCK, Int4Matrix, kernel_available

GROUP = 32  # values per scale (and min): GGUF's block of the 4/5/8-bit types
KINDS = ("int4", "int8")
BLOCK_ROWS = 1024  # rows expanded to float at a time when computing (Qwen, k=1536: 6 MB of float32)


@dataclass
class QRows:
    """n quantized rows of k values. int4: `codes` [n, k/2] uint8, `mins` [n, k/32] float16; int8:
    `codes` [n, k] int8, `mins` None. `scales` [n, k/32] float16. The tensors may be views of records."""

    kind: str
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    @property
    def k(self) -> int:
        return self.scales.shape[1] * GROUP

    @property
    def nbytes(self) -> int:
        return self.n * row_bytes(self.kind, self.k)

    def __getitem__(self, rows: slice) -> QRows:
        mins = self.mins[rows] if self.mins is not None else None
        return QRows(self.kind, self.codes[rows], self.scales[rows], mins)


def _check(kind: str, k: int) -> None:
    if kind not in KINDS:
        raise FlashLLMError(f"quantized row kind {kind!r} is not supported (supported: {', '.join(KINDS)})")
    if k % GROUP:
        raise FlashLLMError(f"rows of {k} values cannot be quantized in groups of {GROUP}")


def code_bytes(kind: str, k: int) -> int:
    return k // 2 if kind == "int4" else k


def row_bytes(kind: str, k: int) -> int:
    """Bytes of one row in record form: int4 0.625 bytes a value (5 bits), int8 1.0625 (8.5 bits)."""
    _check(kind, k)
    groups = k // GROUP
    return code_bytes(kind, k) + groups * 2 * (2 if kind == "int4" else 1)


def quantize_rows(w: torch.Tensor, kind: str) -> QRows:
    """w [n, k] float -> QRows. int4: min/max per group; int8: max |w| per group. Scale and min are
    rounded to float16 first and the codes chosen against the stored values, so every value is within
    half a step (plus the float16 rounding of the min) of w."""
    n, k = w.shape
    _check(kind, k)
    wg = w.float().reshape(n, k // GROUP, GROUP)  # [n, G, 32]
    if kind == "int4":
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        mins = lo.to(torch.float16)
        scale = ((hi - mins.float()) / 15).to(torch.float16)
        step = torch.where(scale > 0, scale.float(), torch.ones_like(hi))
        q = torch.round((wg - mins.float()) / step).clamp_(0, 15).to(torch.uint8).view(n, k)
        codes = q[:, 0::2] | (q[:, 1::2] << 4)
        return QRows("int4", codes.contiguous(), scale.view(n, -1), mins.view(n, -1))
    amax = wg.abs().amax(-1, keepdim=True)
    scale = (amax / 127).to(torch.float16)
    step = torch.where(scale > 0, scale.float(), torch.ones_like(amax))
    q = torch.round(wg / step).clamp_(-127, 127).to(torch.int8).view(n, k)
    return QRows("int8", q, scale.view(n, -1))


def unpack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[n, k/2] uint8 plain nibbles -> [n, k] uint8 codes 0..15."""
    return torch.stack((codes & 0x0F, codes >> 4), -1).view(codes.shape[0], -1)


def dequantize_rows(q: QRows, out: torch.Tensor | None = None) -> torch.Tensor:
    """QRows -> [n, k] float32 (into `out`'s first n rows when given, to reuse one buffer per block)."""
    n, k = q.n, q.k
    out = out[:n] if out is not None else torch.empty(n, k, dtype=torch.float32)
    if q.kind == "int4":  # the nibbles straight into the even and odd columns (2x faster than unpacking)
        pairs = out.view(n, k // 2, 2)
        pairs[..., 0].copy_(q.codes & 0x0F)
        pairs[..., 1].copy_(q.codes >> 4)
    else:
        out.view(n, -1, GROUP).copy_(q.codes.view(n, -1, GROUP))  # int8 -> float32
    og = out.view(n, -1, GROUP)
    og.mul_(q.scales.float().unsqueeze(-1))
    if q.mins is not None:
        og.add_(q.mins.float().unsqueeze(-1))
    return out


class Workspace:
    """The buffers every computation on quantized rows reuses, made once: a block of rows expanded to
    float32 and the nibbles of a block of int4 codes. Under a budget (FlashModel) one workspace serves the
    whole model, so the hot path allocates nothing that grows with a block (freed multi-MB temporaries
    are what made the process's peak drift above the plan)."""

    def __init__(self, k: int, rows: int = BLOCK_ROWS):
        self.k, self.rows = k, rows
        self.floats = torch.empty(rows * k, dtype=torch.float32)
        self.nibbles = torch.empty(rows * k // 2, dtype=torch.uint8)

    @staticmethod
    def bytes_for(k: int, rows: int = BLOCK_ROWS) -> int:
        return rows * k * 4 + rows * k // 2

    @property
    def nbytes(self) -> int:
        return self.floats.nbytes + self.nibbles.nbytes

    def fits(self, q: QRows) -> bool:
        return q.k <= self.k


def _expand_split(q: QRows, work: Workspace | None, mins: bool) -> torch.Tensor:
    """Up to a block of int4 QRows -> float32 [2, n, k/2]: [0] the even columns, [1] the odd ones (each a
    contiguous matrix: two passes over the codes, no strided writes), scaled, minimum added if `mins`."""
    n, k, groups = q.n, q.k, q.k // GROUP
    if work is not None and work.fits(q) and n <= work.rows:
        halves, nibble = work.floats[:n * k].view(2, n, k // 2), work.nibbles[:n * k // 2].view(n, k // 2)
    else:
        halves, nibble = torch.empty(2, n, k // 2), torch.empty(n, k // 2, dtype=torch.uint8)
    torch.bitwise_and(q.codes, 0x0F, out=nibble)
    halves[0].copy_(nibble)
    torch.bitwise_right_shift(q.codes, 4, out=nibble)
    halves[1].copy_(nibble)
    grouped = halves.view(2, n, groups, GROUP // 2)
    grouped.mul_(q.scales.view(1, n, groups, 1))
    if mins:
        grouped.add_(q.mins.view(1, n, groups, 1))
    return halves


def _expand(q: QRows, work: Workspace | None) -> torch.Tensor:
    """Up to a block of int8 QRows -> float32 [n, k], into the workspace when it has room."""
    n, k = q.n, q.k
    out = work.floats[:n * k].view(n, k) if work is not None and work.fits(q) and n <= work.rows else None
    return dequantize_rows(q, out)


# -- record form ------------------------------------------------------------------------------------

def to_records(q: QRows) -> torch.Tensor:
    """QRows -> [n, row_bytes] uint8: per row [codes | scales (| mins)], float16 little-endian."""
    parts = [q.codes.view(torch.uint8), q.scales.contiguous().view(torch.uint8)]
    if q.mins is not None:
        parts.append(q.mins.contiguous().view(torch.uint8))
    return torch.cat(parts, 1)


def _as(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    try:
        return part.view(dtype)  # a view when the offsets and the row stride are even
    except RuntimeError:
        return part.contiguous().view(dtype)


def from_records(records: torch.Tensor, kind: str, k: int) -> QRows:
    """[n, row_bytes] uint8 (any row stride, e.g. a column range of wider neuron records) -> QRows whose
    tensors are views of those bytes (copied only where an odd byte offset forbids a float16 view)."""
    width = row_bytes(kind, k)
    if records.dtype != torch.uint8 or records.dim() != 2 or records.shape[1] != width:
        raise FlashLLMError(f"{kind} records of {k} values must be [n, {width}] uint8, got "
                            f"{list(records.shape)} {records.dtype}")
    c, g = code_bytes(kind, k), k // GROUP
    codes = records[:, :c] if kind == "int4" else _as(records[:, :c], torch.int8)
    scales = _as(records[:, c:c + 2 * g], torch.float16)
    mins = _as(records[:, c + 2 * g:c + 4 * g], torch.float16) if kind == "int4" else None
    return QRows(kind, codes, scales, mins)


# -- computing on quantized rows: a block of rows expanded at a time ---------------------------------

def project(x: torch.Tensor, q: QRows, work: Workspace | None = None, block: int = BLOCK_ROWS) -> torch.Tensor:
    """x [M, k] -> x @ W.T [M, n] float32 (gate/up coefficients of n neurons), a block of rows at a time.
    int4 is computed on the split expansion: x's even and odd columns against the two halves, and the
    minimums through each group's sum of x (sum_j (q s + m) x_j = s sum_j q x_j + m sum_j x_j)."""
    x = x.float()
    y = torch.empty(x.shape[0], q.n)
    if q.kind == "int4":
        even, odd = x[:, 0::2].contiguous(), x[:, 1::2].contiguous()
        sums = x.view(x.shape[0], -1, GROUP).sum(-1)  # [M, groups]
    for start in range(0, q.n, block):
        rows = q[start:start + block]
        out = y[:, start:start + rows.n]
        if q.kind == "int4":
            halves = _expand_split(rows, work, mins=False)
            torch.mm(even, halves[0].T, out=out)
            out.addmm_(odd, halves[1].T).addmm_(sums, rows.mins.T.float())
        else:
            torch.mm(x, _expand(rows, work).T, out=out)
    return y


def combine(a: torch.Tensor, q: QRows, work: Workspace | None = None, block: int = BLOCK_ROWS) -> torch.Tensor:
    """a [M, n] -> a @ W [M, k] float32 (the FFN output as a weighted sum of n down columns)."""
    a = a.float()
    y = torch.zeros(a.shape[0], q.k)
    pairs = y.view(a.shape[0], q.k // 2, 2)
    for start in range(0, q.n, block):
        rows = q[start:start + block]
        weights = a[:, start:start + rows.n]
        if q.kind == "int4":  # the even and odd output columns from the two halves
            halves = _expand_split(rows, work, mins=True)
            pairs[..., 0].add_(weights @ halves[0])
            pairs[..., 1].add_(weights @ halves[1])
        else:
            y.addmm_(weights, _expand(rows, work))
    return y


# -- torch's CPU kernels, for resident matrices (attention, LM head) ----------------------------------

def to_int4_kernel(q: QRows, prepare: bool = True):
    """int4 QRows -> flashllm.models.quant.Int4Matrix in the layout of torch's `_weight_int4pack_mm_for_cpu`
    (same codes; bfloat16 scale and zero z = min + 8 * scale, since the kernel computes (q - 8) * s + z).
    The bfloat16 rounding of s and z costs up to 2^-9 of each: measured in scripts/quant_error.py."""
    if q.kind != "int4":
        raise FlashLLMError(f"the int4 kernel needs int4 rows, not {q.kind}")
    n, pad = q.n, -q.n % _ROW_BLOCK  # the kernel packs rows in blocks of 64: zero rows pad the tail
    scale, low = q.scales.float(), q.mins.float()  # [n, G]
    sz = torch.stack([scale, low + 8 * scale], -1).to(torch.bfloat16)  # [n, G, 2]
    codes = q.codes
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad, codes.shape[1])])
        sz = torch.cat([sz, sz.new_zeros(pad, *sz.shape[1:])])
    m = Int4Matrix(codes.contiguous(), sz.transpose(0, 1).contiguous(), n, GROUP)
    return m.prepare() if prepare else m


@dataclass
class Int8ChannelMatrix:
    """W [n, k] as int8 codes with ONE float32 scale per row, the form of torch's `_weight_int8pack_mm`.
    Our rows carry a scale per 32 values, which that kernel cannot take, so building this requantizes
    (lossy: one outlier widens the step of its whole row)."""

    codes: torch.Tensor  # [n, k] int8
    scales: torch.Tensor  # [n] float32

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, k] -> x @ W.T [M, n] float32."""
        return torch.ops.aten._weight_int8pack_mm(x.float().contiguous(), self.codes, self.scales)

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scales.unsqueeze(1)


GROUPED_MIN_ROWS = 8192  # int8 matrices this tall (LM heads) are kept as Int8Groups under a budget
GROUPED_TOKENS = 16  # up to this many tokens a pass Int8Groups computes in the kernel; more: expanded


class Int8Groups:
    """W [n, k] as our int8 rows (a float16 scale per 32 values), kept as k/32 contiguous blocks of codes
    [n, 32], the form in which torch's `_weight_int8pack_mm` (one scale per row) computes x @ W.T exactly:
    block g's products (x in bfloat16) times the rows' scales of group g, summed in float32. The same
    bytes as the rows; for Qwen's LM head (151,936 x 1,536) ~79 ms a token against 143 ms expanding
    the rows to float32 a block at a time (float32 scales would save ~15 ms for 15 MB more). Passes of
    more than GROUPED_TOKENS tokens expand blocks."""

    def __init__(self, n: int, k: int):
        _check("int8", k)
        self.n, self.k = n, k
        self.codes = torch.empty(k // GROUP, n, GROUP, dtype=torch.int8)
        self.scales = torch.empty(k // GROUP, n, dtype=torch.float16)
        self._ones = torch.ones(n, dtype=torch.bfloat16)

    @staticmethod
    def work_bytes(n: int) -> int:
        """A token's temporaries beyond its float32 output (a budgeted model computes the head for one
        token at a time): a group's products (bfloat16) and their float32 promotion."""
        return n * 6

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + self._ones.nbytes

    def write(self, start: int, q: QRows) -> None:
        """int8 rows q into rows [start, start + q.n)."""
        if q.kind != "int8" or q.k != self.k:
            raise FlashLLMError(f"Int8Groups of {self.k} values take int8 rows of as many, not {q.kind} of {q.k}")
        self.codes[:, start:start + q.n] = q.codes.reshape(q.n, -1, GROUP).transpose(0, 1)
        self.scales[:, start:start + q.n] = q.scales.T

    def matmul(self, x: torch.Tensor, work: Workspace | None = None) -> torch.Tensor:
        """x [T, k] -> x @ W.T [T, n] float32."""
        if x.shape[0] > GROUPED_TOKENS:
            return self._expanded(x.float(), work)
        xb = x.to(torch.bfloat16)
        y = torch.zeros(x.shape[0], self.n)
        kernel = torch.ops.aten._weight_int8pack_mm
        for g in range(self.k // GROUP):
            y.addcmul_(kernel(xb[:, g * GROUP:(g + 1) * GROUP].contiguous(), self.codes[g], self._ones), self.scales[g])
        return y

    def _expanded(self, x: torch.Tensor, work: Workspace | None) -> torch.Tensor:
        y = torch.empty(x.shape[0], self.n)
        for start in range(0, self.n, BLOCK_ROWS):
            stop = min(start + BLOCK_ROWS, self.n)
            w = work.floats[:(stop - start) * self.k] if work is not None and work.fits(self) else \
                torch.empty((stop - start) * self.k)
            w = w.view(stop - start, -1, GROUP)
            w.copy_(self.codes[:, start:stop].transpose(0, 1))
            w.mul_(self.scales[:, start:stop].T.unsqueeze(-1))
            y[:, start:stop] = x @ w.view(stop - start, self.k).T
        return y


def to_int8_kernel(q: QRows | torch.Tensor) -> Int8ChannelMatrix:
    """QRows (either kind) or float rows [n, k] -> Int8ChannelMatrix (per-row symmetric, max |w| / 127)."""
    w = q if isinstance(q, torch.Tensor) else dequantize_rows(q)
    w = w.float()
    scale = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # [n]
    codes = torch.round(w / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return Int8ChannelMatrix(codes, scale)


# -- weights of any form, as the model uses them ---------------------------------------------------

Weight = "torch.Tensor | QRows | Int4Matrix"


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None, work: Workspace | None = None,
           int8_x: bool = False) -> torch.Tensor:
    """x [T, k] @ w.T (+ bias) -> [T, n] in x's dtype, for a float matrix, QRows (in C where it builds, x
    quantized to int8 groups with `int8_x`; else expanded a block of rows at a time, into `work` when given)
    or a matrix in a kernel's form (Int4Matrix)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    if isinstance(w, QRows):  # straight from the codes in C where it builds (float32; Qwen's head 2x faster)
        y = native.matmul(w, x, int8_x=int8_x) if native.available() else project(x, w, work)
    else:
        y = w.matmul(x, work) if isinstance(w, Int8Groups) else w.matmul(x)
    y = y.to(x.dtype)
    return y if bias is None else y + bias


def take_rows(w, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a float matrix, QRows or Int8Groups (expanded to float32): the embedding lookup."""
    if isinstance(w, torch.Tensor):
        return w[ids]
    if isinstance(w, Int8Groups):
        codes = w.codes[:, ids].transpose(0, 1).reshape(len(ids), w.k)
        return dequantize_rows(QRows("int8", codes, w.scales[:, ids].T))
    mins = w.mins[ids] if w.mins is not None else None
    return dequantize_rows(QRows(w.kind, w.codes[ids], w.scales[ids], mins))


def for_compute(w):
    """The form a resident matrix computes fastest in: int4 rows in torch's int4 kernel layout where this
    torch has it (the same 4.5-5 bits a weight), anything else as it is."""
    if isinstance(w, QRows) and w.kind == "int4" and kernel_available():
        return to_int4_kernel(w)
    return w


def weight_nbytes(w) -> int:
    """DRAM a weight keeps, whatever its form."""
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    if isinstance(w, QRows):
        return sum(t.numel() * t.element_size() for t in (w.codes, w.scales, w.mins) if t is not None)
    return w.nbytes
