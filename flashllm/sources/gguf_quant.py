"""GGUF tensors read as our quantized rows (flashllm.models.qrows), keeping the file's own grid.

GGUF quantizes each tensor along its rows (the inner dimension, ne0): a gate/up row [d] or an attention
row is one GGUF row, and its blocks convert to ours without rounding any code:
- Q4_0 (w = d * (q - 8)), Q4_1 (w = d * q + m)        -> int4, exact (scale d, min -8d or m);
- Q4_K: super-blocks of 256 = 8 groups of 32 with 6-bit sc, m and float16 d, dmin: w = d*sc*q - dmin*m
                                                        -> int4 with scale fp16(d*sc), min fp16(-dmin*m):
  off by at most 15 half-ulps of the scale + one of the min (about 0.7% of a step, bound below);
- Q8_0 (w = d * q), Q5_0 (w = d * (q - 16))           -> int8, exact;
- Q5_1, Q5_K, Q6_K: dequantized and requantized to int8 per group of 32 (max |w| / 127: an error of at
  most half an int8 step, measured against the GGUF values in scripts/quant_error.py);
- F16/BF16/F32 -> a float tensor of the file's dtype.
The down projection [d, n_ff] is quantized along n_ff, so a neuron's down COLUMN is not a GGUF row:
`transpose_requantize` dequantizes, transposes and quantizes rows of d.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flashllm.errors import FlashLLMError
from flashllm.models.qrows import GROUP, QRows, quantize_rows

_HALF_ULP16 = 2.0 ** -11  # float16 unit roundoff (normal range)
_HALF_SUBNORMAL16 = 2.0 ** -25  # half the float16 subnormal spacing
_TRANSPOSE_COLS = 1024  # columns dequantized at a time by transpose_requantize (Qwen down: 6 MB float32)


def _types():
    from gguf.constants import GGMLQuantizationType as T

    return T


def precision_class(tensor_type) -> str:
    """The auto precision of a GGUF tensor type: Q4_x -> "int4", Q5_x/Q6_K/Q8_0 -> "int8",
    F16/BF16/F32 -> "float16"; anything else is a FlashLLMError."""
    T = _types()
    tensor_type = T(tensor_type)
    if tensor_type in (T.Q4_0, T.Q4_1, T.Q4_K):
        return "int4"
    if tensor_type in (T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K, T.Q8_0):
        return "int8"
    if tensor_type in (T.F16, T.BF16, T.F32):
        return "float16"
    raise FlashLLMError(f"GGUF tensor type {tensor_type.name} is not supported "
                        "(supported: Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, F16, BF16, F32)")


@dataclass(frozen=True)
class GGUFTensor:
    """Where a GGUF tensor's bytes are: `shape` (rows, cols) in torch order, cols the quantized dimension."""

    path: Path
    name: str
    tensor_type: object  # GGMLQuantizationType
    shape: tuple[int, int]
    offset: int
    row_bytes: int

    @classmethod
    def from_reader(cls, path: Path, t) -> GGUFTensor:
        from gguf.constants import GGML_QUANT_SIZES

        dims = [int(n) for n in t.shape]  # ne0 first
        cols, rows = dims[0], int(np.prod(dims[1:])) if len(dims) > 1 else 1
        block, size = GGML_QUANT_SIZES[t.tensor_type]
        if cols % block:
            raise FlashLLMError(f"{path}: tensor {t.name} has rows of {cols} values, not whole blocks of {block}")
        return cls(Path(path), t.name, t.tensor_type, (rows, cols), int(t.data_offset), cols // block * size)


def gguf_tensors(path: Path) -> dict[str, GGUFTensor]:
    """Name -> GGUFTensor for every tensor of a GGUF file (the header only; no tensor data is read)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on damaged files
        raise FlashLLMError(f"{path}: damaged or truncated GGUF file ({e})") from None
    return {t.name: GGUFTensor.from_reader(path, t) for t in reader.tensors}


def read_raw(tensor: GGUFTensor, rows: slice | None = None) -> np.ndarray:
    """These rows' bytes, [n, row_bytes] uint8, read with pread (not through a memory map, whose touched
    pages would count against our memory)."""
    first, last, _ = (rows or slice(None)).indices(tensor.shape[0])
    n = max(last - first, 0)
    out = np.empty((n, tensor.row_bytes), dtype=np.uint8)  # writable, so torch can view it
    flat, got = out.reshape(-1), 0
    with open(tensor.path, "rb") as f:
        while got < flat.nbytes:  # a single read returns at most ~2 GB
            step = os.preadv(f.fileno(), [flat[got:]], tensor.offset + first * tensor.row_bytes + got)
            if step <= 0:
                break
            got += step
    if got != flat.nbytes:
        raise FlashLLMError(f"{tensor.path}: tensor {tensor.name} is truncated")
    return out


def dequantize_raw(raw: np.ndarray, tensor_type, k: int) -> torch.Tensor:
    """GGUF's own dequantization of [n, bytes] blocks -> [n, k] float32 (the reference values)."""
    from gguf.quants import dequantize

    try:
        array = dequantize(np.ascontiguousarray(raw), tensor_type)
    except Exception as e:
        raise FlashLLMError(f"GGUF tensor type {_types()(tensor_type).name} cannot be dequantized ({e})") from None
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True).reshape(raw.shape[0], k))


# -- blocks -> our rows -------------------------------------------------------------------------------

def _blocks(raw: np.ndarray, tensor_type) -> torch.Tensor:
    from gguf.constants import GGML_QUANT_SIZES

    size = GGML_QUANT_SIZES[tensor_type][1]
    return torch.from_numpy(np.ascontiguousarray(raw)).view(-1, size)  # [n * blocks, size]


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    return blocks[:, at:at + 2].contiguous().view(torch.float16)  # [B, 1]


def _pack(q: torch.Tensor, n: int) -> torch.Tensor:
    """codes 0..15 in value order [.., 32] -> our plain nibbles [n, k/2]."""
    q = q.reshape(n, -1)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def _split_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """GGUF's 32-value nibble group (byte j: value j low, value j + 16 high) [.., 16] -> codes [.., 32]."""
    return torch.cat((qs & 0x0F, qs >> 4), -1)


def _q4_0(b: torch.Tensor, n: int) -> QRows:
    d = _f16(b, 0)  # [B, 1]
    q = _split_nibbles(b[:, 2:18])  # [B, 32]
    return QRows("int4", _pack(q, n), d.reshape(n, -1), (d * -8).reshape(n, -1))  # -8d: exact in float16


def _q4_1(b: torch.Tensor, n: int) -> QRows:
    q = _split_nibbles(b[:, 4:20])
    return QRows("int4", _pack(q, n), _f16(b, 0).reshape(n, -1), _f16(b, 2).reshape(n, -1))


def q4_k_scale_min(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K blocks [B, 144] -> the exact float32 d*sc and dmin*m of the 8 groups, [B, 8] each."""
    s = b[:, 4:16].to(torch.int32)  # 12 bytes of 6-bit scales and mins
    lo, hi, mix = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)), 1)
    m = torch.cat((hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)), 1)
    d, dmin = _f16(b, 0).float(), _f16(b, 2).float()
    return d * sc.float(), dmin * m.float()  # 11 x 6 bits: exact in float32


def _q4_k(b: torch.Tensor, n: int) -> QRows:
    scale, dm = q4_k_scale_min(b)
    q = torch.cat((b[:, 16:144].reshape(-1, 4, 1, 32) & 0x0F, b[:, 16:144].reshape(-1, 4, 1, 32) >> 4), 2)
    return QRows("int4", _pack(q, n), scale.to(torch.float16).reshape(n, -1), (-dm).to(torch.float16).reshape(n, -1))


def _q8_0(b: torch.Tensor, n: int) -> QRows:
    codes = b[:, 2:34].contiguous().view(torch.int8).reshape(n, -1)
    return QRows("int8", codes, _f16(b, 0).reshape(n, -1))


def _q5_0(b: torch.Tensor, n: int) -> QRows:
    bits = torch.arange(8, dtype=torch.uint8)
    qh = ((b[:, 2:6].unsqueeze(-1) >> bits) & 1).reshape(-1, 32)  # bit j of the little-endian uint32
    q = _split_nibbles(b[:, 6:22]) | (qh << 4)  # 0..31
    codes = (q.to(torch.int16) - 16).to(torch.int8).reshape(n, -1)
    return QRows("int8", codes, _f16(b, 0).reshape(n, -1))


def _direct():
    T = _types()
    return {T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q4_K: _q4_k, T.Q8_0: _q8_0, T.Q5_0: _q5_0}


def rows_from_raw(raw: np.ndarray, tensor_type, k: int, kind: str | None = None) -> QRows | torch.Tensor:
    """[n, bytes] raw GGUF rows of k values -> our rows of `kind` ("int4", "int8", "float16"; None: the
    type's precision_class). The grid is kept where it fits (see the module docstring); otherwise the
    rows go through float32 (GGUF's dequantization) and are quantized again. "float16" returns the
    file's F16/BF16/F32 as is, or quantized types as float32."""
    T = _types()
    tensor_type = T(tensor_type)
    auto = precision_class(tensor_type)
    kind = kind or auto
    n = raw.shape[0]
    if k % GROUP and kind != "float16":
        raise FlashLLMError(f"rows of {k} values cannot be quantized in groups of {GROUP}")
    if kind == auto and tensor_type in _direct():
        return _direct()[tensor_type](_blocks(raw, tensor_type), n)
    if tensor_type in (T.F16, T.BF16, T.F32) and kind == "float16":
        dtype = {T.F16: torch.float16, T.BF16: torch.bfloat16, T.F32: torch.float32}[tensor_type]
        return torch.from_numpy(np.ascontiguousarray(raw)).view(dtype).reshape(n, k)
    w = dequantize_raw(raw, tensor_type, k)  # [n, k]
    return w if kind == "float16" else quantize_rows(w, kind)


def read_rows(tensor: GGUFTensor, rows: slice | None = None, kind: str | None = None) -> QRows | torch.Tensor:
    """These rows of a GGUF tensor as our rows (see rows_from_raw)."""
    return rows_from_raw(read_raw(tensor, rows), tensor.tensor_type, tensor.shape[1], kind)


def q4_k_bound(raw: np.ndarray) -> torch.Tensor:
    """The largest |ours - GGUF's| per value that converting these Q4_K rows may cost, [n, k]: the
    float16 rounding of scale = d*sc (times q <= 15) and of min = dmin*m, each at most half an ulp:
    max(2^-11 |x|, 2^-25) (subnormals), plus 2^-23 |w| for the float32 evaluation of either side."""
    from gguf.constants import GGMLQuantizationType as T

    b = _blocks(raw, T.Q4_K)
    scale, dm = q4_k_scale_min(b)  # [B, 8]

    def half_ulp(x):
        return torch.clamp_min(x.abs() * _HALF_ULP16, _HALF_SUBNORMAL16)

    bound = 15 * half_ulp(scale) + half_ulp(dm)  # [B, 8]
    w_max = 15 * scale + dm  # |w| <= max(15 d sc, dmin m) <= their sum
    n = raw.shape[0]
    return (bound + 2.0 ** -23 * w_max).repeat_interleave(GROUP, 1).reshape(n, -1)


# -- columns of a tensor (the down projection) as rows ----------------------------------------------

def transpose_requantize(tensor: GGUFTensor, kind: str, cols: slice | None = None,
                         raw: np.ndarray | None = None) -> QRows:
    """Columns `cols` of a GGUF tensor [rows, cols_total] as `kind` rows [n_cols, rows]: e.g. the down
    projection [d, n_ff] -> one row of d values per neuron. Dequantized with GGUF's own code a block of
    columns at a time, transposed and quantized (int4 min/max or int8 symmetric per 32 values). `raw`:
    the tensor's bytes when already read (read_raw), to convert several column ranges from one read."""
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[tensor.tensor_type]
    first, last, _ = (cols or slice(None)).indices(tensor.shape[1])
    if first % block or (last % block and last != tensor.shape[1]):
        raise FlashLLMError(f"columns {first}:{last} of {tensor.name} do not fall on its blocks of {block}")
    raw = read_raw(tensor) if raw is None else raw  # [rows, row_bytes]
    step = max(_TRANSPOSE_COLS // block, 1) * block
    parts = []
    for start in range(first, last, step):
        stop = min(start + step, last)
        w = dequantize_raw(raw[:, start // block * size:stop // block * size], tensor.tensor_type, stop - start)
        parts.append(quantize_rows(w.T, kind))  # [stop - start, rows]
    mins = torch.cat([p.mins for p in parts]) if kind == "int4" else None
    return QRows(kind, torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), mins)
