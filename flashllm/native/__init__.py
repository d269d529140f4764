"""The FFN over quantized neuron records in C (ffn_rows.c), built with the machine's C compiler on first use.

torch has no kernel that reads our records as they lie on flash (int4 groups of 32 with a float16 scale
and minimum, int8 groups with a scale): the Python path repacks each record for torch's int4 kernel or
expands it to float32, ~10 us a record. `ffn_rows` computes a record's gate and up products, its
coefficient and its down column's share straight from the bytes (AVX2/FMA where the compiler targets them,
plain C elsewhere), float32 throughout or, with `int8_x` (`--dots int8`), gate and up as integer sums over
x quantized to int8 per group of 32 (as llama.cpp's q8 blocks; ~2x faster), the records split between
threads, the GIL released (ctypes).

The library is compiled once per source, compiler flags and CPU into $FLASHLLM_HOME/native, or
$FLASHLLM_NATIVE_DIR where set (written to a temporary name, then renamed; two processes building at once
each rename a whole file). No compiler, a failed build, or FLASHLLM_NATIVE=0: `library()` is None and
the engine keeps its torch path (`why_not()` says why, for --verbose).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from flashllm.paths import home

SOURCE = Path(__file__).with_name("ffn_rows.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-pthread")
KINDS = {"int4": 1, "int8": 2}
MAX_THREADS = 16  # ffn_rows.c's own limit
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_why_not: list[str] = []


def _cpu() -> str:
    """What the compiled code depends on: the machine and its CPU's flags (-march=native)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def build(target: Path, flags: tuple[str, ...] = FLAGS) -> Path:
    """Compile ffn_rows.c into `target` (a temporary name, then renamed); raises OSError or
    subprocess.CalledProcessError."""
    compiler = shlex.split(os.environ.get("CC", "")) or [c for c in (shutil.which("cc") or shutil.which("gcc"),) if c]
    if not compiler:
        raise OSError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([*compiler, *flags, "-o", tmp, str(SOURCE), "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.ffn_rows.restype = _I
    lib.ffn_rows.argtypes = [_P, _I, _I, _P, _I, _C, _I, _C, _I, _C, _I, _I, _C, _P, _I, _P, ctypes.c_float, _C,
                             _C, _P, _P, _P]
    lib.ffn_rows_work_floats.restype = _I
    lib.ffn_rows_work_floats.argtypes = [_I, _I]
    lib.ffn_rows_vector.restype = _C
    lib.ffn_rows_vector.argtypes = []
    lib.rows_matmul.restype = None
    lib.rows_matmul.argtypes = [_P, _I, _P, _I, _P, _I, _C, _I, _I, _P, _I, _C, _C, _P, _P]
    lib.rows_matmul_work_floats.restype = _I
    lib.rows_matmul_work_floats.argtypes = [_I, _I]
    return lib


def library_path() -> Path:
    """Where this source, these flags and this CPU's build lives."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu().encode()).hexdigest()[:16]
    return Path(os.environ.get("FLASHLLM_NATIVE_DIR") or home() / "native") / f"ffn_rows-{key}.so"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled library, built on first use; None where it cannot be (see why_not)."""
    if os.environ.get("FLASHLLM_NATIVE", "1") == "0":
        _why_not.append("FLASHLLM_NATIVE=0")
        return None
    try:
        path = library_path()
        if path.exists():
            try:
                return load(path)
            except OSError:  # a damaged file (a copy cut short, a disk error): built again below
                pass
        return load(build(path))
    except subprocess.CalledProcessError as e:
        last = (e.stderr or "").strip().splitlines()
        _why_not.append(f"compiling {SOURCE.name} failed: {last[-1] if last else e}")
    except (OSError, subprocess.SubprocessError) as e:
        _why_not.append(f"the C helper could not be built or loaded: {e}")
    return None


def available() -> bool:
    return library() is not None


def why_not() -> str:
    library()
    return _why_not[-1] if _why_not else ""


def k_bytes(kind: str, k: int) -> int:
    """Bytes of one part of k values: codes, float16 scales (and int4 minimums) per 32."""
    return (k // 2 + 4 * (k // 32)) if kind == "int4" else (k + 2 * (k // 32))


def vector() -> bool:
    """Whether the build took the AVX2/FMA/F16C path."""
    lib = library()
    return bool(lib is not None and lib.ffn_rows_vector())


def _rows_of(t: torch.Tensor) -> tuple[int, int]:
    """A matrix of rows whose values are contiguous (any row stride): its address and row stride in bytes."""
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError("quantized rows must have contiguous values")
    return t.data_ptr(), t.stride(0) * t.element_size()


def matmul_work_bytes(k: int, tokens: int) -> int:
    """matmul's temporary for `tokens` rows of x of k values (its float32 and int8 forms)."""
    lib = library()
    return 4 * lib.rows_matmul_work_floats(k, tokens) if lib is not None else 0


def matmul(q, x: torch.Tensor, threads: int | None = None, lib: ctypes.CDLL | None = None,
           int8_x: bool = False) -> torch.Tensor:
    """x [T, k] @ W.T -> [T, n] float32 for quantized rows W (flashllm.models.qrows.QRows, int4 or int8, any
    row stride: views of records as loaded), float32 throughout or, with int8_x, integer sums over x quantized
    to int8 groups; the rows split between threads."""
    lib = lib or library()
    if lib is None:
        raise RuntimeError(f"the native kernels are not available: {why_not()}")
    x = x.float().contiguous()
    T, n, k = x.shape[0], q.n, q.k
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} values a row, the matrix {k}")
    if q.kind not in KINDS or tuple(q.codes.shape) != (n, k // 2 if q.kind == "int4" else k) or \
            q.scales.dtype != torch.float16 or tuple(q.scales.shape) != (n, k // 32) or \
            (q.kind == "int4") != (q.mins is not None) or (q.mins is not None and (
                q.mins.dtype != torch.float16 or tuple(q.mins.shape) != (n, k // 32))):
        raise ValueError(f"not {q.kind} rows of {k} values in flashllm's layout")
    y = torch.empty(T, n)
    if n == 0 or T == 0:
        return y.zero_()
    codes, scales = _rows_of(q.codes), _rows_of(q.scales)
    mins = _rows_of(q.mins) if q.mins is not None else (None, 0)
    work = torch.empty(lib.rows_matmul_work_floats(k, T))
    lib.rows_matmul(codes[0], codes[1], scales[0], scales[1], mins[0], mins[1], KINDS[q.kind], n, k,
                    x.data_ptr(), T, int(int8_x), min(MAX_THREADS, max(1, threads or torch.get_num_threads())), work.data_ptr(),
                    y.data_ptr())
    return y


class RecordFFN:
    """The FFN over one layout's records: where gate, up and down sit in a record and their kinds."""

    def __init__(self, offsets: tuple[int, int, int], kinds: tuple[str, str, str], d: int, activation: str,
                 threads: int | None = None, lib: ctypes.CDLL | None = None, int8_x: bool = False):
        self.lib = lib or library()
        self.int8_x = int8_x
        if self.lib is None:
            raise RuntimeError(f"the native FFN is not available: {why_not()}")
        self.offsets, self.kinds = offsets, tuple(KINDS[k] for k in kinds)
        self.d, self.activation = d, ACTIVATIONS[activation]
        self.threads = min(MAX_THREADS, max(1, threads or torch.get_num_threads()))
        widths = [k_bytes(kind, d) for kind in kinds]
        self.record_end = max(offset + width for offset, width in zip(offsets, widths))

    @staticmethod
    def supports(parts: dict[str, str | None], activation: str) -> bool:
        """Whether records with these parts ({name: kind}) can be computed here: quantized gate, up and
        down, no up bias, a gated activation this file knows."""
        return set(parts) == {"gate", "up", "down"} and all(kind in KINDS for kind in parts.values()) \
            and activation in ACTIVATIONS

    def work_bytes(self, tokens: int, records: int) -> int:
        """The temporaries of a call over `tokens` tokens and up to `records` records: each thread's split
        of x and products, the other threads' partial sums, y, x as float32 and the keep mask as bytes."""
        floats = self.lib.ffn_rows_work_floats(self.d, tokens)
        return 4 * (self.threads * floats + (self.threads + 2) * tokens * self.d) + tokens * records

    def __call__(self, rows: np.ndarray, x: torch.Tensor, keep: torch.Tensor | None, threshold: float | None,
                 index: np.ndarray | None = None, n: int | None = None) -> torch.Tensor:
        """sum over records r of a_r * down_r -> [T, d] float32, a_r = act(gate_r . x) * (up_r . x) where
        keep[:, r] (None: every record) and, with a threshold, |a_r| > threshold.

        rows: uint8 [*, record bytes or more], C-contiguous; the records are rows[index] (int64) when
        given, else rows[:n]. keep: bool [T, records]."""
        if rows.dtype != np.uint8 or rows.ndim != 2 or not rows.flags.c_contiguous or \
                (rows.shape[0] and rows.shape[1] < self.record_end):
            raise ValueError(f"rows must be a C-contiguous uint8 matrix of records of {self.record_end}+ bytes")
        if x.dim() != 2 or x.shape[1] != self.d:
            raise ValueError(f"x must be [T, {self.d}], got {list(x.shape)}")
        if keep is not None and keep.dtype != torch.bool:
            raise ValueError(f"keep must be bool, got {keep.dtype}")
        count = len(index) if index is not None else (n if n is not None else rows.shape[0])
        x = x.float().contiguous()
        T = x.shape[0]
        y = torch.zeros(T, self.d)
        if count == 0:
            return y
        if index is not None:
            index = np.ascontiguousarray(index, dtype=np.int64)
            if len(index) and (index.min() < 0 or index.max() >= rows.shape[0]):
                raise IndexError("record index out of range")
        elif count > rows.shape[0]:
            raise IndexError(f"{count} records asked of {rows.shape[0]} rows")
        mask = None
        if keep is not None:
            if tuple(keep.shape) != (T, count):
                raise ValueError(f"keep must be [{T}, {count}], got {list(keep.shape)}")
            mask = keep.contiguous().view(torch.uint8)
        threads = min(self.threads, count)
        work = torch.empty(threads * self.lib.ffn_rows_work_floats(self.d, T))
        partial = torch.empty(max(threads - 1, 0), T, self.d)
        self.lib.ffn_rows(rows.ctypes.data, count, rows.strides[0], None if index is None else index.ctypes.data,
                          self.offsets[0], self.kinds[0], self.offsets[1], self.kinds[1], self.offsets[2],
                          self.kinds[2], self.record_end, self.d, self.activation, x.data_ptr(), T,
                          None if mask is None else mask.data_ptr(),
                          -1.0 if threshold is None else float(threshold), int(self.int8_x), threads, work.data_ptr(),
                          partial.data_ptr(), y.data_ptr())
        return y
