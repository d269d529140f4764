"""Quantized rows: within half a step of the weights, records that round-trip as views, products equal
to the expanded rows; GGUF blocks converted exactly (Q4_0, Q4_1, Q8_0, Q5_0), within the float16
rounding of scale and min (Q4_K), or within half an int8 step (Q5_1, Q5_K, Q6_K)."""

import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import quantize

from flashllm.models import quant
from flashllm.errors import FlashLLMError
from flashllm.models import qrows
from flashllm.models.qrows import GROUP
from flashllm.sources import gguf_quant


def half_ulp16(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp_min(x.float().abs() * 2.0 ** -11, 2.0 ** -25)


def per_value(groups: torch.Tensor) -> torch.Tensor:
    return groups.float().repeat_interleave(GROUP, 1)  # [n, k/32] -> [n, k]


def step_bound(q: qrows.QRows) -> torch.Tensor:
    """What quantize_rows promises per value: half a step, plus the float16 rounding of min and scale."""
    s = per_value(q.scales)
    if q.kind == "int4":
        return 0.5 * s + per_value(half_ulp16(q.mins)) + 15 * half_ulp16(s)
    return 0.5 * s + 127 * half_ulp16(s)


@pytest.mark.parametrize("kind", qrows.KINDS)
@pytest.mark.parametrize("n,k", [(7, 32), (100, 256), (33, 576)])
def test_rows_within_half_a_step(kind, n, k):
    torch.manual_seed(n + k)
    w = torch.randn(n, k) * 0.05
    w[0] = 0.3  # a constant row: scale 0
    w[1, :GROUP] = torch.randn(GROUP) * 1e-6  # float16 subnormal scales
    q = qrows.quantize_rows(w, kind)
    back = qrows.dequantize_rows(q)
    assert back.shape == (n, k) and q.nbytes == n * qrows.row_bytes(kind, k)
    assert bool(((back - w).abs() <= step_bound(q)).all())
    assert float((back - w).norm() / w.norm()) < (0.1 if kind == "int4" else 0.01)


def test_row_bytes_and_bad_shapes():
    assert qrows.row_bytes("int4", 1536) == 768 + 48 * 4 == 960
    assert qrows.row_bytes("int8", 1536) == 1536 + 48 * 2 == 1632
    with pytest.raises(FlashLLMError, match="groups of 32"):
        qrows.quantize_rows(torch.zeros(2, 48), "int4")
    with pytest.raises(FlashLLMError, match="not supported"):
        qrows.row_bytes("int3", 64)


@pytest.mark.parametrize("kind", qrows.KINDS)
def test_records_round_trip_as_views(kind):
    torch.manual_seed(1)
    n, k = 50, 128
    q = qrows.quantize_rows(torch.randn(n, k), kind)
    width = qrows.row_bytes(kind, k)
    # a neuron record: [gate | up | down] rows back to back; take the middle part as a strided view
    records = torch.cat([qrows.to_records(q)] * 3, 1)  # [n, 3 * width]
    assert records.shape == (n, 3 * width)
    part = records[:, width:2 * width]
    back = qrows.from_records(part, kind, k)
    assert back.codes.data_ptr() == part.data_ptr()  # views, no copy
    assert back.scales.untyped_storage().data_ptr() == records.untyped_storage().data_ptr()
    assert torch.equal(qrows.dequantize_rows(back), qrows.dequantize_rows(q))
    with pytest.raises(FlashLLMError, match="records"):
        qrows.from_records(records, kind, k)


@pytest.mark.parametrize("kind", qrows.KINDS)
@pytest.mark.parametrize("m", [1, 5])
def test_project_and_combine_equal_the_expanded_rows(kind, m):
    torch.manual_seed(m)
    n, k = 70, 96
    q = qrows.from_records(qrows.to_records(qrows.quantize_rows(torch.randn(n, k), kind)), kind, k)
    w = qrows.dequantize_rows(q)
    x, a = torch.randn(m, k), torch.randn(m, n)
    close = {"rtol": 1e-5, "atol": 1e-4}  # float32, summed in another order (int4: minimums through sums of x)
    torch.testing.assert_close(qrows.project(x, q, block=32), x @ w.T, **close)
    torch.testing.assert_close(qrows.combine(a, q, block=32), a @ w, **close)
    work = qrows.Workspace(k, rows=32)  # the reused buffers give the same numbers, and are what is written
    work.floats.fill_(float("nan"))
    torch.testing.assert_close(qrows.project(x, q, work, block=32), x @ w.T, **close)
    torch.testing.assert_close(qrows.combine(a, q, work, block=32), a @ w, **close)
    assert not work.floats.isnan().any()


@pytest.mark.skipif(not quant.kernel_available(), reason="torch has no CPU int4 kernel")
def test_int4_kernel_form():
    torch.manual_seed(2)
    n, k = 100, 256  # 100 rows: padded to 128 for the kernel
    q = qrows.quantize_rows(torch.randn(n, k) * 0.05, "int4")
    m = qrows.to_int4_kernel(q, prepare=False)
    expanded = qrows.dequantize_rows(q)
    # bfloat16 scale and zero (z = min + 8 * scale): within 2^-9 of each, relative
    s, z = per_value(q.scales), per_value(q.mins.float() + 8 * q.scales.float())
    assert bool(((m.dequantize()[:n] - expanded).abs() <= (8 * s + z.abs()) * 2.0 ** -8 + 1e-7).all())
    x = torch.randn(3, k)
    m.prepare()
    y = m.matmul(x)
    assert y.shape == (3, n)
    assert float((y - x @ expanded.T).abs().max()) < 0.02 * float((x @ expanded.T).abs().max())


def test_int8_kernel_form():
    torch.manual_seed(3)
    w = torch.randn(40, 64)
    m = qrows.to_int8_kernel(qrows.quantize_rows(w, "int8"))
    x = torch.randn(2, 64)
    torch.testing.assert_close(m.matmul(x), x @ m.dequantize().T, rtol=1e-4, atol=1e-4)
    assert float((m.dequantize() - w).abs().max()) <= float(m.scales.max()) * 0.6 + 0.03


@pytest.mark.parametrize("tokens", [1, 3, qrows.GROUPED_TOKENS + 1])
def test_int8_groups_compute_the_rows_exactly_up_to_bfloat16(tokens):
    """Int8Groups (the LM head's compute form) holds the same codes and scales as the rows: products within
    bfloat16 of the expanded rows in the kernel, equal to them when expanded (long passes), rows taken
    for an embedding lookup equal, and the same bytes as the rows."""
    torch.manual_seed(tokens)
    q = qrows.quantize_rows(torch.randn(300, 96) * 0.05, "int8")
    m = qrows.Int8Groups(300, 96)
    m.write(0, q[0:77])  # in pieces, as the bundle reader fills it
    m.write(77, q[77:300])
    w = qrows.dequantize_rows(q)
    x = torch.randn(tokens, 96)
    y, reference = m.matmul(x), x @ w.T
    exact = tokens > qrows.GROUPED_TOKENS
    assert float((y - reference).abs().max()) <= (1e-5 if exact else 1e-2) * float(reference.abs().max())
    ids = torch.tensor([0, 299, 77, 76, 5])
    assert torch.equal(qrows.take_rows(m, ids), w[ids])
    assert m.codes.nbytes + m.scales.nbytes == q.nbytes
    with pytest.raises(FlashLLMError):
        m.write(0, qrows.quantize_rows(torch.randn(3, 96), "int4"))


# -- GGUF blocks --------------------------------------------------------------------------------------

def gguf_reference(raw: np.ndarray, qtype, k: int) -> torch.Tensor:
    return gguf_quant.dequantize_raw(raw, qtype, k)


def as_float(rows) -> torch.Tensor:
    return qrows.dequantize_rows(rows) if isinstance(rows, qrows.QRows) else rows.float()


@pytest.mark.parametrize("qtype,kind", [(T.Q4_0, "int4"), (T.Q4_1, "int4"), (T.Q8_0, "int8"), (T.Q5_0, "int8")])
def test_grid_types_convert_exactly(qtype, kind):
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((6, 256)) * 0.05).astype(np.float32)
    w[0, :32] = 0  # a zero block: d = 0
    raw = quantize(w, qtype)  # [6, row bytes] uint8
    rows = gguf_quant.rows_from_raw(raw, qtype, 256)
    assert isinstance(rows, qrows.QRows) and rows.kind == kind == gguf_quant.precision_class(qtype)
    assert torch.equal(qrows.dequantize_rows(rows), gguf_reference(raw, qtype, 256))  # bit for bit


def random_blocks(qtype, n_blocks: int, seed: int, tiny: bool = False) -> np.ndarray:
    """Random K-quant blocks (any bits are valid) with float16 d/dmin of a weight's magnitude; `tiny`
    puts d and dmin in float16's subnormal range."""
    rng = np.random.default_rng(seed)
    size = GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    scale = 1e-7 if tiny else 1e-3
    d = (rng.uniform(0.1, 2, (n_blocks, 2)) * scale).astype(np.float16).view(np.uint8)
    at = {T.Q4_K: 0, T.Q5_K: 0, T.Q6_K: size - 2}[qtype]
    blocks[:, at:at + (4 if qtype != T.Q6_K else 2)] = d[:, :4 if qtype != T.Q6_K else 2]
    return blocks


@pytest.mark.parametrize("tiny", [False, True])
def test_q4_k_within_the_float16_rounding_of_scale_and_min(tiny):
    n, k = 8, 512
    raw = random_blocks(T.Q4_K, n * k // 256, seed=5 + tiny, tiny=tiny).reshape(n, -1)
    rows = gguf_quant.rows_from_raw(raw, T.Q4_K, k)
    assert rows.kind == "int4"
    ref, ours = gguf_reference(raw, T.Q4_K, k), qrows.dequantize_rows(rows)
    bound = gguf_quant.q4_k_bound(raw)
    assert bool(((ours - ref).abs() <= bound).all())
    if not tiny:  # normal float16 range: within 2^-11 of the group's reach 15 * scale + |min|
        reach = 15 * per_value(rows.scales) + per_value(rows.mins).abs()
        assert float(((ours - ref).abs() / reach.clamp_min(1e-12)).max()) <= 2.0 ** -11 * 1.01


def test_q4_k_exact_when_scales_fit_float16():
    raw = random_blocks(T.Q4_K, 4, seed=6)
    raw[:, 0:4] = np.array([2.0 ** -10, 2.0 ** -11], dtype=np.float16).view(np.uint8)  # d*sc: 6 bits
    assert torch.equal(qrows.dequantize_rows(gguf_quant.rows_from_raw(raw, T.Q4_K, 256)),
                       gguf_reference(raw, T.Q4_K, 256))


@pytest.mark.parametrize("qtype", [T.Q5_K, T.Q6_K])
def test_k_quants_requantized_to_int8(qtype):
    n, k = 4, 512
    raw = random_blocks(qtype, n * k // 256, seed=7).reshape(n, -1)
    rows = gguf_quant.rows_from_raw(raw, qtype, k)
    assert rows.kind == "int8"
    ref = gguf_reference(raw, qtype, k)
    assert bool(((qrows.dequantize_rows(rows) - ref).abs() <= step_bound(rows)).all())


def test_q5_1_requantized_and_kinds_on_request():
    w = (np.random.default_rng(8).standard_normal((3, 64)) * 0.05).astype(np.float32)
    raw = quantize(w, T.Q5_1)
    rows = gguf_quant.rows_from_raw(raw, T.Q5_1, 64)
    ref = gguf_reference(raw, T.Q5_1, 64)
    assert rows.kind == "int8" and bool(((qrows.dequantize_rows(rows) - ref).abs() <= step_bound(rows)).all())
    as_int4 = gguf_quant.rows_from_raw(quantize(w, T.Q8_0), T.Q8_0, 64, kind="int4")
    assert as_int4.kind == "int4"
    floats = gguf_quant.rows_from_raw(raw, T.Q5_1, 64, kind="float16")
    assert torch.equal(floats, ref)


@pytest.mark.parametrize("qtype,dtype", [(T.F16, torch.float16), (T.F32, torch.float32), (T.BF16, torch.bfloat16)])
def test_float_types_pass_through(qtype, dtype):
    w = torch.randn(3, 40).to(dtype)
    raw = w.contiguous().view(torch.uint8).numpy()
    out = gguf_quant.rows_from_raw(raw, qtype, 40)
    assert out.dtype == dtype and torch.equal(out, w)


def test_precision_class():
    expected = {T.Q4_0: "int4", T.Q4_1: "int4", T.Q4_K: "int4", T.Q5_0: "int8", T.Q5_1: "int8",
                T.Q5_K: "int8", T.Q6_K: "int8", T.Q8_0: "int8", T.F16: "float16", T.BF16: "float16",
                T.F32: "float16"}
    for qtype, kind in expected.items():
        assert gguf_quant.precision_class(qtype) == gguf_quant.precision_class(int(qtype)) == kind
    with pytest.raises(FlashLLMError, match="Q2_K is not supported"):
        gguf_quant.precision_class(T.Q2_K)


def write_gguf(path, tensors: dict) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (raw, qtype) in tensors.items():
        writer.add_tensor(name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_transpose_requantize_from_a_file(tmp_path):
    rows, cols = 64, 768  # a down projection [d, n_ff] of Q4_K super-blocks
    raw = random_blocks(T.Q4_K, rows * cols // 256, seed=9).reshape(rows, -1)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, {"down": (raw, T.Q4_K)})
    t = gguf_quant.gguf_tensors(path)["down"]
    assert t.shape == (rows, cols) and t.row_bytes == 3 * 144
    np.testing.assert_array_equal(gguf_quant.read_raw(t, slice(10, 20)), raw[10:20])
    ref = gguf_reference(raw, T.Q4_K, cols)
    assert torch.equal(qrows.dequantize_rows(gguf_quant.read_rows(t, slice(10, 20))),
                       qrows.dequantize_rows(gguf_quant.rows_from_raw(raw[10:20], T.Q4_K, cols)))
    for kind in qrows.KINDS:
        full = gguf_quant.transpose_requantize(t, kind)
        assert (full.n, full.k) == (cols, rows)
        assert bool(((qrows.dequantize_rows(full) - ref.T).abs() <= step_bound(full)).all())
        part = gguf_quant.transpose_requantize(t, kind, slice(256, 768))
        assert torch.equal(qrows.dequantize_rows(part), qrows.dequantize_rows(full)[256:])
    with pytest.raises(FlashLLMError, match="blocks of 256"):
        gguf_quant.transpose_requantize(t, "int8", slice(100, 300))


@pytest.mark.realmodel
def test_real_smollm2_rows(smollm2_gguf):
    tensors = gguf_quant.gguf_tensors(smollm2_gguf)
    gate, down = tensors["blk.0.ffn_gate.weight"], tensors["blk.0.ffn_down.weight"]
    assert gate.tensor_type == T.Q4_1 and gate.shape == (1536, 576) and down.shape == (576, 1536)
    raw = gguf_quant.read_raw(gate, slice(100, 300))
    rows = gguf_quant.read_rows(gate, slice(100, 300))
    assert rows.kind == "int4" and torch.equal(qrows.dequantize_rows(rows), gguf_reference(raw, T.Q4_1, 576))
    columns = gguf_quant.transpose_requantize(down, "int8")  # [1536 neurons, 576]
    ref = gguf_reference(gguf_quant.read_raw(down), T.Q4_1, 1536).T
    back = qrows.dequantize_rows(columns)
    assert bool(((back - ref).abs() <= step_bound(columns)).all())
    assert float((back - ref).norm() / ref.norm()) < 0.01
    embedding = gguf_quant.read_rows(tensors["token_embd.weight"], slice(0, 8))
    assert embedding.kind == "int8"  # Q8_0: exact
    assert torch.equal(qrows.dequantize_rows(embedding),
                       gguf_reference(gguf_quant.read_raw(tensors["token_embd.weight"], slice(0, 8)), T.Q8_0, 576))
