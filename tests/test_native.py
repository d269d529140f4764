"""The C FFN over quantized records (flashllm.native) against the same sums in torch, both of its builds
(AVX2/FMA for this machine, and plain C), and its refusal of what it cannot serve."""

import platform
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flashllm import native
from flashllm.models.ffn import activate
from flashllm.models.qrows import dequantize_rows, from_records, quantize_rows, row_bytes, to_records

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the engine keeps its torch path")

D = 288  # nine groups of 32 values: the vector path's 8-group loops and their scalar tail


@pytest.fixture(scope="module", params=["vector", "plain"])
def lib(request, tmp_path_factory):
    """The library as the engine builds it (-march=native) and without any vector extension."""
    if request.param == "vector":
        lib = native.library()
        if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma", "f16c"} <= cpu_flags():
            assert lib.ffn_rows_vector() == 1  # this CPU has them: the engine's build must take that path
        return lib
    flags = tuple(f for f in native.FLAGS if f != "-march=native")
    if platform.machine() in ("x86_64", "AMD64"):
        flags += ("-mno-avx2", "-mno-fma", "-mno-f16c")
    lib = native.load(native.build(tmp_path_factory.mktemp("plain") / "plain.so", flags))
    assert lib.ffn_rows_vector() == 0
    return lib


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())


def records(n: int, kinds: tuple[str, str, str], seed: int = 0) -> tuple[np.ndarray, dict]:
    """n records [gate | up | down] of these kinds with a spare byte at the end of each (a row wider than
    the record, as the engine's scratch rows are), the float rows they stand for and their minimums (0 for
    int8), a value each."""
    g = torch.Generator().manual_seed(seed)
    parts, mins, rows, columns, start = {}, {}, [], {}, 0
    for name, kind in zip(("gate", "up", "down"), kinds):
        w = torch.randn(n, D, generator=g) * (0.3 if name != "down" else 0.1)
        q = quantize_rows(w, kind)
        rows.append(to_records(q))
        q = from_records(rows[-1], kind, D)
        parts[name] = dequantize_rows(q)
        mins[name] = torch.zeros(n, D) if q.mins is None else q.mins.float().repeat_interleave(32, 1)
        columns[name] = start
        start += row_bytes(kind, D)
    rows.append(torch.zeros(n, 1, dtype=torch.uint8))
    return np.ascontiguousarray(torch.cat(rows, 1).numpy()), {"values": parts, "mins": mins, "offsets": columns}


def int8_groups(x: torch.Tensor) -> torch.Tensor:
    """x as the C kernels quantize it for int8 dot products: per group of 32, scale max |x| / 127, values
    rounded to nearest even; returned expanded (q * scale)."""
    groups = x.float().reshape(*x.shape[:-1], -1, 32)
    scale = groups.abs().amax(-1, keepdim=True) / 127
    q = torch.where(scale > 0, torch.round(groups / scale), torch.zeros_like(groups)).clamp(-127, 127)
    return (q * scale).reshape(x.shape)


def dot_int8_x(w: torch.Tensor, mins: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x @ w.T as the int8 dot products compute it: (w - its minimum) times x quantized, plus the
    minimum times x's float sums."""
    return int8_groups(x) @ (w - mins).T + x @ mins.T


def close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to float32 summation order: within 2e-5 of the largest output value."""
    return got.shape == expected.shape and float((got - expected).abs().max()) <= 2e-5 * float(expected.abs().max()) + 1e-7


def reference(parts: dict, x: torch.Tensor, keep: torch.Tensor | None, threshold: float | None,
              activation: str, mins: dict | None = None) -> torch.Tensor:
    """The FFN's sum in float32; with `mins` (the parts' minimums), gate and up over x as int8 groups."""
    if mins is None:
        a = activate(x @ parts["gate"].T, activation) * (x @ parts["up"].T)  # [T, n]
    else:
        a = activate(dot_int8_x(parts["gate"], mins["gate"], x), activation) * dot_int8_x(parts["up"], mins["up"], x)
    chosen = torch.ones_like(a, dtype=torch.bool) if keep is None else keep.clone()
    if threshold is not None:
        chosen &= a.abs() > threshold
    return (a * chosen) @ parts["down"]


@pytest.mark.parametrize("kinds", [("int4", "int4", "int8"), ("int8", "int8", "int4"), ("int4", "int8", "int4")])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
def test_records_sum_like_torch(lib, kinds, activation):
    rows, made = records(300, kinds)
    offsets = tuple(made["offsets"][p] for p in ("gate", "up", "down"))
    g = torch.Generator().manual_seed(1)
    for T in (1, 3, 6):
        x = torch.randn(T, D, generator=g)
        keep = torch.rand(T, 300, generator=g) > 0.3
        for threads in (1, 2, 3):
            ffn = native.RecordFFN(offsets, kinds, D, activation, threads=threads, lib=lib)
            for mask, threshold in ((None, None), (keep, None), (keep, 0.05)):
                expected = reference(made["values"], x, mask, threshold, activation)
                got = ffn(rows, x, mask, threshold)
                assert close(got, expected), (T, threads, threshold)


@pytest.mark.parametrize("kinds", [("int4", "int4", "int8"), ("int8", "int8", "int4"), ("int4", "int8", "int4")])
def test_int8_dot_products_sum_like_their_emulation(lib, kinds):
    """int8_x: gate and up over x quantized per group of 32 (integer sums in C) equal torch's float sums over
    the same quantized x exactly up to summation order; and they are not the float32 path's numbers."""
    rows, made = records(300, kinds, seed=4)
    offsets = tuple(made["offsets"][p] for p in ("gate", "up", "down"))
    g = torch.Generator().manual_seed(5)
    for T in (1, 3, 6):  # one token (decode's own loop) and blocks of tokens
        x = torch.randn(T, D, generator=g)
        x[:, 7] = 0  # a zero and an outlier in the groups' scales
        x[0, 40] = 9.0
        keep = torch.rand(T, 300, generator=g) > 0.3
        for threads in (1, 2):
            ffn = native.RecordFFN(offsets, kinds, D, "silu", threads=threads, lib=lib, int8_x=True)
            for mask, threshold in ((None, None), (keep, 0.05)):
                expected = reference(made["values"], x, mask, threshold, "silu", made["mins"])
                got = ffn(rows, x, mask, threshold)
                assert close(got, expected), (T, threads, threshold)
        exact = reference(made["values"], x, None, None, "silu")
        assert not close(got := ffn(rows, x, None, None), exact)
        assert float((got - exact).abs().max()) < 0.1 * float(exact.abs().max())  # near: an outlier coarsens its group
    x = torch.zeros(1, D)  # all-zero groups: scale 0, no division by it
    assert torch.equal(native.RecordFFN(offsets, kinds, D, "silu", lib=lib, int8_x=True)(rows, x, None, None),
                       torch.zeros(1, D))


def test_records_by_index_and_by_count(lib):
    """The cache's case (records wherever their slots are) and the scratch's (the first n rows)."""
    kinds = ("int4", "int4", "int8")
    rows, made = records(200, kinds, seed=2)
    ffn = native.RecordFFN(tuple(made["offsets"][p] for p in ("gate", "up", "down")), kinds, D, "silu", lib=lib)
    x = torch.randn(2, D)
    slots = np.array([150, 3, 77, 199, 0, 42])
    parts = {name: v[torch.from_numpy(slots)] for name, v in made["values"].items()}
    keep = torch.tensor([[True, False, True, True, True, False], [True, True, True, False, True, True]])
    assert close(ffn(rows, x, keep, 0.01, index=slots), reference(parts, x, keep, 0.01, "silu"))
    first = {name: v[:40] for name, v in made["values"].items()}
    assert close(ffn(rows, x, None, None, n=40), reference(first, x, None, None, "silu"))
    assert torch.equal(ffn(rows, x, None, None, n=0), torch.zeros(2, D))
    assert ffn(rows, x.double(), None, None, n=5).dtype == torch.float32  # x in any float dtype


def test_bad_calls_are_refused_before_reaching_c():
    kinds = ("int4", "int4", "int8")
    rows, made = records(10, kinds)
    ffn = native.RecordFFN(tuple(made["offsets"][p] for p in ("gate", "up", "down")), kinds, D, "silu")
    x = torch.randn(1, D)
    with pytest.raises(IndexError):
        ffn(rows, x, None, None, index=np.array([0, 10]))
    with pytest.raises(IndexError):
        ffn(rows, x, None, None, n=11)
    with pytest.raises(ValueError):
        ffn(rows[:, ::2], x, None, None)  # not contiguous
    with pytest.raises(ValueError):
        ffn(rows, x, torch.ones(1, 3, dtype=torch.bool), None)
    with pytest.raises(ValueError):
        ffn(rows, x, torch.ones(1, 10), None)  # a float mask
    with pytest.raises(ValueError):
        ffn(rows, torch.randn(D), None, None)  # x without its token axis
    with pytest.raises(ValueError):
        ffn(rows, torch.randn(1, D + 32), None, None)
    with pytest.raises(ValueError):
        ffn(np.ascontiguousarray(rows[:, :-40]), x, None, None)  # rows narrower than the records


def test_what_the_c_ffn_does_not_serve():
    assert native.RecordFFN.supports({"gate": "int4", "up": "int4", "down": "int8"}, "silu")
    assert not native.RecordFFN.supports({"gate": None, "up": None, "down": None}, "silu")  # float records
    assert not native.RecordFFN.supports({"up": "int4", "down": "int4", "up_bias": None}, "relu")  # ReLU + bias
    assert not native.RecordFFN.supports({"gate": "int4", "up": "int4", "down": "int8"}, "relu")


def test_disabled_or_unbuildable_leaves_the_torch_path(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHLLM_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert not native.available() and native.why_not() == "FLASHLLM_NATIVE=0"
    finally:
        monkeypatch.delenv("FLASHLLM_NATIVE")
        native.library.cache_clear()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("FLASHLLM_NATIVE_DIR", str(tmp_path / "builds"))  # nothing built there yet
    try:
        assert not native.available() and "could not be built" in native.why_not()
        assert not list((tmp_path / "builds").rglob("*"))  # no half-written library left behind
    finally:
        monkeypatch.delenv("CC")
        native.library.cache_clear()
    assert native.available()


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantized_rows_times_x_like_torch(lib, kind):
    """native.matmul: the LM head's and other resident matrices' products straight from their rows (views
    of records as loaded, any row stride), float32, the rows split between threads."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(301, D, generator=g) * 0.2
    q = from_records(to_records(quantize_rows(w, kind)), kind, D)  # views of [n, row bytes] records
    assert q.codes.stride(0) == row_bytes(kind, D) // q.codes.element_size()
    expected_w = dequantize_rows(q)
    for T in (1, 4, 5):
        x = torch.randn(T, D, generator=g)
        for threads in (1, 2, 7):
            got = native.matmul(q, x, threads=threads, lib=lib)
            assert close(got, x @ expected_w.T), (T, threads)
        got = native.matmul(q, x, lib=lib, int8_x=True)
        mins = torch.zeros_like(expected_w) if q.mins is None else q.mins.float().repeat_interleave(32, 1)
        assert close(got, dot_int8_x(expected_w, mins, x)), T
    with pytest.raises(ValueError):
        native.matmul(q, torch.randn(1, D + 32), lib=lib)


def test_a_damaged_build_is_built_again(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHLLM_NATIVE_DIR", str(tmp_path / "builds"))
    native.library.cache_clear()
    try:
        path = native.library_path()
        path.parent.mkdir(parents=True)
        path.write_bytes(b"not a shared library")  # e.g. a copy cut short
        assert native.available() and path.read_bytes()[:4] == b"\x7fELF"
    finally:
        monkeypatch.delenv("FLASHLLM_NATIVE_DIR")
        native.library.cache_clear()
