"""4-bit group quantization: codes within half a step of the weights, the kernel's product equal to the
product with the expanded rows, and a chunked conversion equal to a whole one."""

import pytest
import torch

from flashllm.models import quant


@pytest.mark.parametrize("rows,k", [(100, 64), (2100, 256), (48, 576)])
def test_codes_within_half_a_step(rows, k):
    torch.manual_seed(rows)
    w = torch.randn(rows, k) * 0.05
    m = quant.quantize(w)
    assert m.group == quant.group_size(k) and k % m.group == 0
    assert m.codes.shape == (-(-rows // 64) * 64, k // 2) and m.rows == rows
    back = m.dequantize()[:rows]
    step = m.scales_zeros[..., 0].float().T[:rows].repeat_interleave(m.group, 1)  # [rows, k] scale per value
    assert bool(((back - w).abs() <= 0.5 * step * 1.02 + 1e-6).all())
    assert float((back - w).norm() / w.norm()) < 0.15


@pytest.mark.skipif(not quant.kernel_available(), reason="torch has no CPU int4 kernel")
def test_kernel_product_equals_expanded_rows():
    torch.manual_seed(0)
    w = torch.randn(2100, 256) * 0.05  # 2112 padded rows: converted as 1024 + 1024 + 64
    m = quant.quantize(w)
    x = torch.randn(5, 256)
    expected = x @ m.dequantize()[:2100].T
    slow = m.matmul(x)  # expanded rows in bfloat16
    m.prepare()
    fast = m.matmul(x)
    assert fast.shape == (5, 2100) and m.codes.numel() == 0
    scale = float(expected.abs().max())
    assert float((fast - expected).abs().max()) < 0.02 * scale
    assert float((slow - expected).abs().max()) < 0.02 * scale
    assert m.nbytes == 2112 * 128 + m.scales_zeros.numel() * 2


@pytest.mark.skipif(not quant.kernel_available(), reason="torch has no CPU int4 kernel")
def test_chunked_conversion_equals_whole():
    codes = torch.randint(0, 16, (2112, 128), dtype=torch.int32)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    plain = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    m = quant.Int4Matrix(plain, torch.zeros(1, 2112, 2, dtype=torch.bfloat16), 2112, 128).prepare()
    assert torch.equal(m.packed, whole)
