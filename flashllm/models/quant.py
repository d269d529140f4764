"""4-bit group quantization of weight rows and the matrix product on it, for the int4 predictors.

A matrix W [N, K] is cut into groups of G consecutive values along K; each group keeps a bfloat16
scale s and zero z and 4-bit codes q in 0..15, with W ~ (q - 8) * s + z (min/max rounding, asymmetric).
Stored as plain nibbles (column 2j in the low half of byte j, 2j + 1 in the high half) and converted
once at load to the layout of torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`), whose bfloat16
path computes x @ W.T from the 4-bit codes without ever expanding W.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZES = (32, 64, 128)  # values per scale/zero pair (4 bytes): 32 by default, as GGUF's 4-bit types
_ROW_BLOCK = 64  # the CPU kernel packs rows in blocks of 64 (and wants N divisible by 16): rows are padded
# with zeros to a multiple of 64, so converting 1024 rows at a time is exact
_CONVERT_ROWS = 1024
_FALLBACK_ROWS = 256  # rows expanded at a time without the kernel (Qwen: ~4 MB of temporaries)


def kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def group_size(k: int) -> int:
    """The default group size for rows of k values: the smallest in GROUP_SIZES dividing k (the closest
    fit: 5 bits per weight at 32; on a GGUF Q4_0/Q4_1 source, groups of 32 recover its grid)."""
    for g in GROUP_SIZES:
        if k % g == 0:
            return g
    raise ValueError(f"no 4-bit group size in {GROUP_SIZES} divides {k}")


@dataclass
class Int4Matrix:
    """W [rows, k] in 4 bits. `codes` is the storage form [rows_padded, k/2] uint8 (plain nibbles);
    `scales_zeros` [k/G, rows_padded, 2] bfloat16. `packed` is the kernel's form, made by `prepare`."""

    codes: torch.Tensor
    scales_zeros: torch.Tensor
    rows: int
    group: int
    packed: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return self.codes.shape[1] * 2

    @property
    def nbytes(self) -> int:
        """What the matrix keeps in DRAM for computing: the kernel's codes (or ours) and the scales."""
        codes = self.packed if self.packed is not None else self.codes
        return codes.numel() * codes.element_size() + self.scales_zeros.numel() * self.scales_zeros.element_size()

    def prepare(self, keep: bool = False, work: dict | None = None) -> "Int4Matrix":
        """Convert the codes to the kernel's layout, a thousand rows at a time (the int32 form the
        converter takes costs ~k * 4 KB), and drop the storage form unless `keep`. `work` ({} shared by
        the calls of a loop) keeps that int32 buffer between calls, so loading many matrices does not
        leave freed buffers scattered through the heap."""
        if self.packed is not None or not kernel_available():
            return self
        n = self.codes.shape[0]
        work = work if work is not None else {}
        buffer = work.get("int32")
        if buffer is None or buffer.shape[1] != self.k:
            buffer = work["int32"] = torch.empty(_CONVERT_ROWS, self.k, dtype=torch.int32)
        packed = torch.empty(n, self.k // 2, dtype=torch.uint8)
        for start in range(0, n, _CONVERT_ROWS):
            chunk = _unpack(self.codes[start:start + _CONVERT_ROWS], buffer)
            packed[start:start + chunk.shape[0]] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(chunk, 1)
        self.packed = packed
        if not keep:
            self.codes = torch.empty(0, self.k // 2, dtype=torch.uint8)
        return self

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, k] -> x @ W.T [T, rows] in float32 (computed in bfloat16)."""
        xb = x.to(torch.bfloat16).contiguous()
        if self.packed is not None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, self.group, self.scales_zeros)
        else:  # no kernel (or not prepared): expand _FALLBACK_ROWS rows at a time; slow, same numbers
            n = self.codes.shape[0]
            y = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
            for start in range(0, n, _FALLBACK_ROWS):
                rows = self.dequantize(slice(start, start + _FALLBACK_ROWS)).to(torch.bfloat16)
                y[:, start:start + rows.shape[0]] = xb @ rows.T
        return y[:, :self.rows].float()

    def dequantize(self, rows: slice | None = None) -> torch.Tensor:
        """W (or these rows of it) as float32 [rows, k], from the storage form."""
        if self.codes.shape[0] == 0 and self.rows > 0:
            raise ValueError("the storage form was dropped by prepare()")
        rows = rows or slice(0, self.codes.shape[0])
        q = _unpack(self.codes[rows]).float()  # [n, k]
        n = q.shape[0]
        sz = self.scales_zeros[:, rows].float()  # [k/G, n, 2]
        scale = sz[..., 0].T.unsqueeze(-1)  # [n, k/G, 1]
        zero = sz[..., 1].T.unsqueeze(-1)
        return ((q.view(n, -1, self.group) - 8) * scale + zero).view(n, -1)


def quantize(w: torch.Tensor, group: int | None = None) -> Int4Matrix:
    """w [rows, k] float -> Int4Matrix (min/max per group, asymmetric)."""
    rows, k = w.shape
    group = group or group_size(k)
    pad = -rows % _ROW_BLOCK
    w = torch.cat([w.float(), w.new_zeros(pad, k, dtype=torch.float32)]) if pad else w.float()
    n = w.shape[0]
    wg = w.view(n, k // group, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    # scale and zero are rounded to what is stored first, so the codes are chosen against them
    scale = ((hi - lo) / 15).to(torch.bfloat16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = (lo + 8 * scale).to(torch.bfloat16).float()  # w = (q - 8) * scale + zero
    q = torch.round((wg - zero) / scale + 8).clamp_(0, 15).to(torch.uint8).view(n, k)
    codes = q[:, 0::2] | (q[:, 1::2] << 4)
    scales_zeros = torch.stack([scale.view(n, -1), zero.view(n, -1)], -1).transpose(0, 1).contiguous()
    return Int4Matrix(codes.contiguous(), scales_zeros.to(torch.bfloat16), rows, group)


def _unpack(codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[n, k/2] uint8 plain nibbles -> [n, k] int32 codes (into `out`'s first n rows when given)."""
    n, k = codes.shape[0], codes.shape[1] * 2
    out = out[:n] if out is not None else torch.empty(n, k, dtype=torch.int32)
    out[:, 0::2] = codes & 0x0F
    out[:, 1::2] = codes >> 4
    return out
