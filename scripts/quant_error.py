"""How much do our quantized rows cost against a GGUF's own values? Decides the neuron record format.

    python scripts/quant_error.py GGUF [GGUF ...] [--layers 0,5,27]

Per FFN down tensor [d, n_ff] (quantized by GGUF along n_ff): its columns (a neuron's down part) are
dequantized, transposed and quantized again as rows of d, int4 (min/max) or int8 (symmetric), groups of
32. Printed: the relative RMS error ||ours - gguf|| / ||gguf|| of each, the worst column's, and for
context an estimate of the GGUF's own rounding error against the original weights (step^2 / 12 of its
grid, relative to the same norm). Then rows converted directly (gate Q4_K/Q4_1 -> int4 through float16
scales), the LM head / embedding rows, and the kernels' forms (int4 with bfloat16 scale/zero; int8 with
one scale per row).
"""

import argparse
import time

import numpy as np
import torch

from flashllm.models import qrows
from flashllm.sources import gguf_quant


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


def worst_row(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((a - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)).max())


def source_noise(raw: np.ndarray, tensor_type, ref: torch.Tensor) -> float:
    """sqrt(mean(step^2) / 12) / rms(w): the uniform-rounding estimate of the file's own error."""
    name = tensor_type.name
    blocks = torch.from_numpy(np.ascontiguousarray(raw)).reshape(-1, raw.shape[1])
    if name == "Q4_K":
        b = blocks.reshape(-1, 144)
        step2 = gguf_quant.q4_k_scale_min(b)[0].pow(2).mean()
    elif name == "Q6_K":
        b = blocks.reshape(-1, 210)
        d = b[:, 208:210].contiguous().view(torch.float16).float()
        step2 = (d * b[:, 192:208].contiguous().view(torch.int8).float()).pow(2).mean()
    elif name in ("Q4_1", "Q4_0", "Q8_0"):
        size = {"Q4_1": 20, "Q4_0": 18, "Q8_0": 34}[name]
        step2 = blocks.reshape(-1, size)[:, 0:2].contiguous().view(torch.float16).float().pow(2).mean()
    else:
        return float("nan")
    return float((step2 / 12).sqrt() / ref.pow(2).mean().sqrt())


def down_table(path, layers) -> list[tuple]:
    tensors = gguf_quant.gguf_tensors(path)
    n_layers = sum(1 for name in tensors if name.endswith("ffn_down.weight"))
    out = []
    for layer in layers if layers is not None else range(n_layers):
        t = tensors[f"blk.{layer}.ffn_down.weight"]
        raw = gguf_quant.read_raw(t)  # [d, n_ff blocks]
        ref = gguf_quant.dequantize_raw(raw, t.tensor_type, t.shape[1]).T.contiguous()  # [n_ff, d]
        row = [layer, t.tensor_type.name, source_noise(raw, t.tensor_type, ref)]
        for kind in qrows.KINDS:
            back = qrows.dequantize_rows(gguf_quant.transpose_requantize(t, kind, raw=raw))
            row += [rel(back, ref), worst_row(back, ref)]
        out.append(tuple(row))
    return out


def other_rows(path) -> list[tuple]:
    """(tensor, what, relative RMS error) for rows kept along GGUF's own dimension and the kernel forms."""
    tensors = gguf_quant.gguf_tensors(path)
    picks = ["blk.0.ffn_gate.weight", "blk.0.attn_q.weight", "output.weight", "token_embd.weight"]
    out = []
    for name in picks:
        if name not in tensors:
            continue
        t = tensors[name]
        raw = gguf_quant.read_raw(t, slice(0, 4096))
        ref = gguf_quant.dequantize_raw(raw, t.tensor_type, t.shape[1])
        rows = gguf_quant.rows_from_raw(raw, t.tensor_type, t.shape[1])
        kind = gguf_quant.precision_class(t.tensor_type)
        out.append((name, t.tensor_type.name, f"-> {kind} rows", rel(qrows.dequantize_rows(rows), ref),
                    float((qrows.dequantize_rows(rows) - ref).abs().max())))
        forms = {"-> int8 kernel (1 scale/row)": qrows.to_int8_kernel(ref).dequantize()}
        if kind == "int4":
            forms["-> int4 kernel (bf16 s,z)"] = qrows.to_int4_kernel(rows, prepare=False).dequantize()[:rows.n]
        for what, back in sorted(forms.items()):
            out.append((name, t.tensor_type.name, what, rel(back, ref), float((back - ref).abs().max())))
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("gguf", nargs="+")
    parser.add_argument("--layers", default=None, help="comma-separated layer numbers (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    for path in args.gguf:
        start = time.perf_counter()
        print(f"\n{path}")
        print("down columns as rows of d, relative RMS error vs the GGUF's values (worst column in brackets)")
        print(f"{'layer':>5} {'type':>5} {'file est.':>9} {'int4':>16} {'int8':>16}")
        table = down_table(path, layers)
        for layer, name, src, e4, w4, e8, w8 in table:
            print(f"{layer:>5} {name:>5} {src:>9.4f} {e4:>7.4f} ({w4:.4f}) {e8:>7.4f} ({w8:.4f})")
        for name in sorted({r[1] for r in table}):
            sel = [r for r in table if r[1] == name]
            src, e4, e8 = (np.mean([r[i] for r in sel]) for i in (2, 3, 5))
            w4, w8 = (max(r[i] for r in sel) for i in (4, 6))
            print(f"{'mean':>5} {name:>5} {src:>9.4f} {e4:>7.4f} ({w4:.4f}) {e8:>7.4f} ({w8:.4f})")
        print("rows along the GGUF's own dimension (first 4096 rows)")
        for name, kind, what, err, worst in other_rows(path):
            print(f"  {name:<24} {kind:>5} {what:<30} rel RMS {err:.2e}  max abs {worst:.2e}")
        print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
