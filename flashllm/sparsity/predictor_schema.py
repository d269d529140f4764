"""predictors.json as a table of fields, checked against the bundle it sits in before anything is loaded:
one threshold (and rank, window count and calibrated sparsity) per layer of this bundle, finite numbers,
a group size the int4 kernel takes, and tensors in predictors.safetensors of the shapes this bundle's FFN
implies. A foreign model's predictors (another layer count or FFN width) are refused in one line."""

from __future__ import annotations

from pathlib import Path

from flashllm.bundle.reader import Bundle
from flashllm.bundle.schema import FLOATS, read_safetensors_header
from flashllm.errors import FlashLLMError
from flashllm.models.quant import _ROW_BLOCK, GROUP_SIZES
from flashllm.sources.checks import Bool, Dict, Int, List, Number, Str, check, show

PER_LAYER = {"length": "layers", "name": "one per layer of the bundle"}
CUTS = List(Number(), **PER_LAYER)  # decision cuts on a logit: any finite number
THRESHOLDS = List(Number(low=0), **PER_LAYER)  # activation thresholds on |a|
PREDICTORS = Dict({
    "sparsity": Number(low=0, below=1),
    "layer_sparsity": List(Number(low=0, high=1), required=False, null=True, **PER_LAYER),  # calibrated, per layer
    "activation_thresholds": THRESHOLDS,
    "decision_thresholds": CUTS,
    "ranks": List(Int(0), **PER_LAYER),
    "target_recall": Number(above=0, high=1, required=False),
    "gated": Bool(required=False),
    "window_stats": Dict({"distinct": List(List(Number(low=0, high="n_ff"), min_items=1), **PER_LAYER)},
                         required=False, null=True),
    "decision_table": Dict(values=CUTS, required=False),
    "threshold_table": Dict(values=THRESHOLDS, required=False),
    "pinned": List(List(Int(0, below="n_ff")), required=False, **PER_LAYER),
})
INT4 = Dict({"n_ff": Int(1), "int4_rows": Int(1), "int4_group": Int(choices=GROUP_SIZES), "int4_activation": Str()})


def check_predictors(settings, settings_path: Path, weights_path: Path, version: tuple[str, int],
                     kinds: tuple[str, ...]) -> None:
    """predictors.json (parsed: `settings`) and predictors.safetensors' header against the bundle they sit
    in; version: (format name, format version) this flashllm reads; kinds: the predictor kinds."""
    if not isinstance(settings, dict) or settings.get("format") != version[0] or \
            settings.get("format_version") != version[1]:
        found = settings.get("format_version") if isinstance(settings, dict) else None
        raise FlashLLMError(f"{settings_path}: predictor format {show(found)} is not supported (this flashllm "
                            f"reads {version[1]}); run `flashllm train-predictor` again")
    bundle = Bundle(settings_path.parent)
    spec, d, n_layers = bundle.spec, bundle.spec.d, bundle.config.num_hidden_layers
    where = f"{settings_path}:"
    context = {"layers": n_layers, "n_ff": spec.n_ff}
    kind = settings.get("kind", "lowrank")
    check(kind, Str(*kinds), f"{where} kind")
    check(settings, PREDICTORS, where, context)
    if settings.get("gated", spec.gated) != spec.gated:
        raise FlashLLMError(f"{where} gated is {show(settings['gated'])}, but this bundle's FFN is "
                            f"{'' if spec.gated else 'not '}gated (predictors of another model?)")
    distinct = (settings.get("window_stats") or {}).get("distinct") or []
    if len({len(counts) for counts in distinct}) > 1:
        raise FlashLLMError(f"{where} window_stats.distinct has lists of different lengths across layers")
    for table in ("decision_table", "threshold_table"):
        for key in settings.get(table) or {}:
            if not _is_share(key):
                raise FlashLLMError(f"{where} {table} has the key {show(key)}, not a number in [0, 1]")
    header, _ = read_safetensors_header(weights_path)
    if kind == "int4":
        check(settings, INT4, where)
        rows, activation = (2 if spec.gated else 1) * spec.n_ff, spec.activation if spec.gated else ""
        for key, value, want in (("n_ff", settings["n_ff"], spec.n_ff), ("int4_rows", settings["int4_rows"], rows),
                                 ("int4_activation", settings["int4_activation"], activation)):
            if value != want:
                raise FlashLLMError(f"{where} {key} is {show(value)}, but this bundle's FFN implies {show(want)} "
                                    f"(predictors of another model?)")
        group = settings["int4_group"]
        if d % group:
            raise FlashLLMError(f"{where} int4_group {group} does not divide the bundle's d = {d}")
        padded = -(-rows // _ROW_BLOCK) * _ROW_BLOCK
        for i in range(n_layers):
            p = f"layers.{i}.predictor."
            _tensor(header, weights_path, p + "codes", [padded, d // 2], ("U8",))
            _tensor(header, weights_path, p + "scales_zeros", [d // group, padded, 2], ("BF16",))
            if p + "bias" in header:
                _tensor(header, weights_path, p + "bias", [spec.n_ff], ("F32",))
        return
    for i, rank in enumerate(settings["ranks"]):
        if rank < 1:
            raise FlashLLMError(f"{where} ranks[{i}] is {rank}, a low-rank predictor needs a rank of at least 1")
        p = f"layers.{i}.predictor."
        _tensor(header, weights_path, p + "in.weight", [rank, d], FLOATS)
        _tensor(header, weights_path, p + "out.weight", [spec.n_ff, rank], FLOATS)
        _tensor(header, weights_path, p + "out.bias", [spec.n_ff], FLOATS)


def _tensor(header: dict, path: Path, name: str, shape: list[int], dtypes: tuple[str, ...]) -> None:
    entry = header.get(name)
    if entry is None:
        raise FlashLLMError(f"{path}: tensor {name} is missing (predictors of another model?)")
    if entry["shape"] != shape or entry["dtype"] not in dtypes:
        raise FlashLLMError(f"{path}: tensor {name} is {entry['dtype']} {entry['shape']}, this bundle needs "
                            f"{'/'.join(dtypes)} {shape} (predictors of another model?)")


def _is_share(key: str) -> bool:
    try:
        return 0 <= float(key) <= 1
    except ValueError:
        return False
