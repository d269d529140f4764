"""Activation sparsity and the predictors that guess, per token and layer, which FFN neurons are needed
before any of them is read from flash.

Active means: ReLU FFN (OPT): a_i > 0, exact. Gated FFN (SwiGLU/GeGLU): |a_i| > t_l with
a_i = act(g_i.x) * (u_i.x) and t_l a per-layer threshold calibrated on text to reach a target sparsity
(CATS, TEAL). t_l = 0 keeps every neuron whose coefficient is not exactly zero: the dense model.

Two kinds of predictor, each with a per-layer decision cut tuned on a validation slice for a target
recall (a missed neuron costs quality while a false positive only costs a read); the sparse FFN keeps
neuron i when it is predicted AND |a_i| > t_l, so with full recall it equals the oracle exactly.
- int4 (default for gated FFNs): the layer's own gate/up rows in 4 bits (flashllm.quant); the
  estimated |a~_i| is the logit. Nothing is trained.
- lowrank (the paper's; default for ReLU FFNs): Linear(d -> r, no bias) then Linear(r -> n_ff) on the
  layer's FFN input, trained with a loss balanced between active and inactive neurons (Deja Vu, LLM in
  a flash). Positives weigh more the larger their coefficient, and the few neurons whose huge
  coefficients it still misses (massive activations on a sequence's first token) are pinned.

Measured on SmolLM2-135M and Qwen2.5-Coder-1.5B (see README): a gated FFN's |a| > t set is hard for a
low-rank score, because |u_i.x| is large for either sign of u_i.x, which no linear score separates (at
50% sparsity and recall 0.99 it reads ~95% of the neurons); the int4 copy reads 50-53%.

Files in the bundle folder: predictors.safetensors and predictors.json (settings, per-layer thresholds,
decision cuts, window statistics, the training report).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flashllm.errors import FlashLLMError
from flashllm.models.ffn import FFNSpec, activate
from flashllm.models.qrows import QRows, to_int4_kernel
from flashllm.models.quant import Int4Matrix, quantize
from flashllm.sources import hash_files
from flashllm.sources.hf import read_header, tensor_loader
from flashllm.sparsity.predictor_schema import check_predictors

FORMAT = "flashllm-predictors"
FORMAT_VERSION = 1
WEIGHTS_FILE = "predictors.safetensors"
SETTINGS_FILE = "predictors.json"
KINDS = ("int4", "lowrank")  # int4: the layer's gate/up in 4 bits (default, gated); lowrank: trained (ReLU)



@dataclass
class LayerPredictor:
    w_in: torch.Tensor  # [r, d]
    w_out: torch.Tensor  # [n_ff, r]
    b_out: torch.Tensor  # [n_ff]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, d] -> [T, n_ff]."""
        return F.linear(F.linear(x, self.w_in), self.w_out, self.b_out)

    @property
    def rank(self) -> int:
        return self.w_in.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w_in, self.w_out, self.b_out))

    @property
    def stored_bytes(self) -> int:
        return sum(t.numel() for t in (self.w_in, self.w_out, self.b_out)) * 2  # float16 on disk

    def to(self, dtype: torch.dtype) -> LayerPredictor:
        return LayerPredictor(*(t.to(dtype).contiguous() for t in (self.w_in, self.w_out, self.b_out)))


@dataclass
class Int4Predictor:
    """The layer's own gate and up rows in 4 bits (flashllm.quant): the estimate of every neuron's
    coefficient, act(g~.x) * (u~.x) gated or u~.x + b ReLU, is the logit. Costs 4.25-5 bits per gate/up
    weight in DRAM but tracks the true active set closely, which no low-rank score of a gated FFN does."""

    matrix: Int4Matrix  # [gate; up] rows (gated) or up rows (ReLU)
    n_ff: int
    activation: str  # "" for a ReLU FFN: the logit is the pre-activation
    bias: torch.Tensor | None = None  # ReLU up bias [n_ff]

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] -> the estimated coefficients a~ [T, n_ff] (float32), signed."""
        y = self.matrix.matmul(x)  # [T, rows] float32
        if self.activation:
            return activate(y[:, :self.n_ff], self.activation) * y[:, self.n_ff:2 * self.n_ff]
        return y + self.bias.float() if self.bias is not None else y

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        a = self.coefficients(x)
        return a.abs_() if self.activation else a

    rank = property(lambda self: 0)

    @property
    def nbytes(self) -> int:
        return self.matrix.nbytes + (self.bias.numel() * 4 if self.bias is not None else 0)

    @property
    def stored_bytes(self) -> int:
        m = self.matrix
        return m.codes.numel() + m.scales_zeros.numel() * 2 + (self.bias.numel() * 4 if self.bias is not None else 0)

    def to(self, dtype: torch.dtype) -> Int4Predictor:
        return self  # computes in bfloat16 whatever the model's dtype

    @staticmethod
    def from_qrows(spec: FFNSpec, gate: QRows, up: QRows) -> Int4Predictor:
        """A gated layer's own int4 gate/up rows (an int4 bundle's records): the same codes in the
        kernel's layout, nothing requantized, so the estimate is the layer's true coefficients up to the
        kernel's bfloat16 scales and zeros (qrows.to_int4_kernel) and "predicting" is computing."""
        both = QRows("int4", torch.cat([gate.codes, up.codes]), torch.cat([gate.scales, up.scales]),
                     torch.cat([gate.mins, up.mins]))
        return Int4Predictor(to_int4_kernel(both, prepare=False), spec.n_ff, spec.activation)

    @staticmethod
    def from_ffn(spec: FFNSpec, ffn: dict[str, torch.Tensor], group: int | None = None) -> Int4Predictor:
        """ffn: {'ffn.gate.weight', 'ffn.up.weight', ['ffn.up.bias']} of one layer; group: values per
        scale and zero (default: quant.group_size, 32)."""
        if spec.gated:
            w = torch.cat([ffn["ffn.gate.weight"], ffn["ffn.up.weight"]])
            return Int4Predictor(quantize(w, group), spec.n_ff, spec.activation)
        bias = ffn.get("ffn.up.bias")
        return Int4Predictor(quantize(ffn["ffn.up.weight"], group), spec.n_ff, "",
                             bias.float() if bias is not None else None)


class Predictors:
    """Per-layer predictors with their settings; `predict` runs on every token of every layer."""

    def __init__(self, layers: list[LayerPredictor], settings: dict, dtype: torch.dtype = torch.float32):
        self.layers = [p.to(dtype) for p in layers]
        self.settings = settings
        self.dtype = dtype
        self.decision_thresholds: list[float] = [float(t) for t in settings["decision_thresholds"]]

    sparsity = property(lambda self: float(self.settings["sparsity"]))
    kind = property(lambda self: self.settings.get("kind", "lowrank"))
    activation_thresholds = property(lambda self: [float(t) for t in self.settings["activation_thresholds"]])
    window_stats = property(lambda self: self.settings.get("window_stats"))
    ranks = property(lambda self: [p.rank for p in self.layers])
    report = property(lambda self: self.settings.get("report", {}))
    threshold_table = property(lambda self: self.settings.get("threshold_table", {}))

    @property
    def nbytes(self) -> int:
        """Bytes the predictors keep in DRAM (in their compute dtype)."""
        return sum(p.nbytes for p in self.layers)

    def logits(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.layers[layer].logits(x.to(self.dtype))

    def predict(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: [T, d] FFN input -> [T, n_ff] bool, the neurons to read for each token."""
        return self.logits(layer, x) >= self.decision_thresholds[layer]

    @staticmethod
    def check_recall(settings: dict, recall: float) -> str:
        """The key of `recall`'s decision cuts in predictors.json's settings (refused when there are none)."""
        table = settings.get("decision_table", {})
        key = next((k for k in table if abs(float(k) - recall) < 1e-9), None)
        if key is None:
            raise FlashLLMError(f"--recall {recall:g}: the predictors have decision cuts for "
                                f"{', '.join(sorted(table, key=float))}")
        return key

    def with_recall(self, recall: float) -> Predictors:
        """The same predictors with the decision cuts tuned for another recall target (see RECALL_GRID)."""
        table = self.settings.get("decision_table", {})
        key = self.check_recall(self.settings, recall)
        settings = dict(self.settings, decision_thresholds=table[key], target_recall=float(key))
        out = Predictors.__new__(Predictors)
        out.layers, out.settings, out.dtype = self.layers, settings, self.dtype
        out.decision_thresholds = [float(t) for t in table[key]]
        return out

    def save(self, folder: Path) -> None:
        """predictors.safetensors (float16) and predictors.json, each written to a temporary name and
        renamed, weights first, so a reader never sees settings without their weights."""
        with PredictorWriter(folder) as writer:
            for i, p in enumerate(self.layers):
                writer.add(i, p)
            writer.finish(dict(self.settings, kind=self.kind, ranks=self.ranks,
                               decision_thresholds=self.decision_thresholds))


def layer_tensors(i: int, p: LayerPredictor | Int4Predictor) -> dict[str, torch.Tensor]:
    """What predictors.safetensors stores for layer i's predictor."""
    prefix = f"layers.{i}.predictor."
    if isinstance(p, Int4Predictor):
        out = {prefix + "codes": p.matrix.codes, prefix + "scales_zeros": p.matrix.scales_zeros}
        if p.bias is not None:
            out[prefix + "bias"] = p.bias.float().contiguous()
        return out
    return {prefix + "in.weight": p.w_in.to(torch.float16).contiguous(),
            prefix + "out.weight": p.w_out.to(torch.float16).contiguous(),
            prefix + "out.bias": p.b_out.to(torch.float16).contiguous()}


_SAFETENSORS_NAMES = {torch.uint8: "U8", torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


class PredictorWriter:
    """Writes predictors layer by layer, so no more than one layer's predictor need be in memory:
    each layer's tensors go to a temporary data file as they come; `finish` writes the safetensors
    header, copies the data behind it and renames it into place, then writes predictors.json the
    same way (weights first: a reader never sees settings without their weights). Leaving the
    `with` block without `finish` removes the temporaries."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.suffix = f".tmp-{os.getpid()}"
        self.data_path = self.folder / (WEIGHTS_FILE + self.suffix + ".data")
        self.entries: dict[str, dict] = {}
        self.offset = 0
        self.ranks: list[int] = []
        try:
            self.data = open(self.data_path, "wb")
        except OSError as e:
            raise FlashLLMError(f"writing predictors into {self.folder} failed: {e.strerror or e}") from None

    def __enter__(self) -> PredictorWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.data.close()
        for name in (WEIGHTS_FILE + self.suffix + ".data", WEIGHTS_FILE + self.suffix, SETTINGS_FILE + self.suffix):
            (self.folder / name).unlink(missing_ok=True)

    def add(self, i: int, p: LayerPredictor | Int4Predictor) -> None:
        if i != len(self.ranks):
            raise ValueError(f"layer {i} written out of order")
        self.ranks.append(p.rank)
        try:
            for name, t in layer_tensors(i, p).items():
                blob = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
                self.entries[name] = {"dtype": _SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                                      "data_offsets": [self.offset, self.offset + len(blob)]}
                self.data.write(blob)
                self.offset += len(blob)
        except OSError as e:
            raise FlashLLMError(f"writing predictors into {self.folder} failed: {e.strerror or e}") from None

    def finish(self, settings: dict) -> None:
        settings = dict(settings, format=FORMAT, format_version=FORMAT_VERSION, ranks=self.ranks)
        weights = self.folder / (WEIGHTS_FILE + self.suffix)
        try:
            self.data.close()
            header = json.dumps({"__metadata__": {"format": FORMAT}, **self.entries}, separators=(",", ":")).encode()
            header += b" " * (-len(header) % 8)
            with open(weights, "wb") as out, open(self.data_path, "rb") as data:
                out.write(len(header).to_bytes(8, "little") + header)
                while chunk := data.read(1 << 20):
                    out.write(chunk)
            settings["weights_file"] = {"file": WEIGHTS_FILE, "bytes": weights.stat().st_size,
                                        "sha256": hash_files([weights])}  # for `flashllm verify`
            (self.folder / (SETTINGS_FILE + self.suffix)).write_text(json.dumps(settings, indent=1))
            umask = os.umask(0)
            os.umask(umask)
            for name in (WEIGHTS_FILE, SETTINGS_FILE):
                with open(self.folder / (name + self.suffix), "rb") as f:
                    os.fsync(f.fileno())
                os.chmod(self.folder / (name + self.suffix), 0o666 & ~umask)
                os.replace(self.folder / (name + self.suffix), self.folder / name)
        except OSError as e:
            raise FlashLLMError(f"writing predictors into {self.folder} failed: {e.strerror or e}") from None


def read_settings(folder: Path) -> dict | None:
    """predictors.json of the bundle at `folder`, checked against the bundle and the weights' header
    (None when it has no predictors)."""
    folder = Path(folder)
    settings_path, weights_path = folder / SETTINGS_FILE, folder / WEIGHTS_FILE
    if not settings_path.exists():
        return None
    try:
        settings = json.loads(settings_path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise FlashLLMError(f"{settings_path}: unreadable ({e}); run `flashllm train-predictor` again") from None
    # format, every field, lengths per layer and tensor shapes, against the bundle (sparsity/predictor_schema.py)
    check_predictors(settings, settings_path, weights_path, (FORMAT, FORMAT_VERSION), KINDS)
    return settings


def predictors_nbytes(folder: Path, dtype: torch.dtype = torch.float32, settings: dict | None = None) -> int | None:
    """What load_predictors(folder, dtype) will keep in DRAM, from the files' headers alone (None: no
    predictors), so a budget can decide before loading them: int4 codes and scales as stored (the
    kernel's packed form is as large as ours), low-rank matrices in `dtype`. `settings`: read_settings'
    result when the caller has it already (not read and checked again)."""
    settings = settings if settings is not None else read_settings(folder)
    if settings is None:
        return None
    header, _ = read_header(Path(folder) / WEIGHTS_FILE)
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        numel = int(np.prod(info["shape"], dtype=np.int64))
        total += numel * (_STORED_ITEMSIZE[info["dtype"]] if settings.get("kind") == "int4" else itemsize)
    return total


_STORED_ITEMSIZE = {"U8": 1, "BF16": 2, "F16": 2, "F32": 4}


def load_predictors(folder: Path, dtype: torch.dtype = torch.float32, settings: dict | None = None) -> Predictors | None:
    """The bundle's predictors, or None when it has none (`settings`: read_settings' result, if at hand)."""
    settings = settings if settings is not None else read_settings(folder)
    if settings is None:
        return None
    weights_path = Path(folder) / WEIGHTS_FILE
    layers = []
    kind = settings.get("kind", "lowrank")
    try:  # pread, tensor by tensor: a memory map's pages would count in our resident set
        header, data_start = read_header(weights_path)
        get = lambda name, out=None: tensor_loader(weights_path, data_start, name, header[name])(None, out)
        work, codes = {}, None
        for i in range(len(settings["ranks"])):
            p = f"layers.{i}.predictor."
            if kind == "int4":  # one layer's storage form at a time (in one reused buffer) -> the kernel's
                codes = get(p + "codes", codes)
                matrix = Int4Matrix(codes, get(p + "scales_zeros"), int(settings["int4_rows"]),
                                    int(settings["int4_group"]))
                matrix.prepare(work=work)
                if matrix.packed is None:  # no int4 kernel in this torch: keep a copy, expanded per call
                    matrix.codes = codes.clone()
                bias = get(p + "bias") if p + "bias" in header else None
                layers.append(Int4Predictor(matrix, int(settings["n_ff"]), settings["int4_activation"], bias))
                continue
            layers.append(LayerPredictor(get(p + "in.weight"), get(p + "out.weight"), get(p + "out.bias")))
    except (OSError, ValueError, KeyError) as e:
        raise FlashLLMError(f"{weights_path}: unreadable predictors ({e}); run `flashllm train-predictor` "
                            f"again") from None
    return Predictors(layers, settings, dtype)
