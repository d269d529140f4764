"""A bundle's manifest as a table of fields (type and range of every key the reader uses), checked once
when the bundle is opened, with the manifest's claims checked against each other and against the files:
the config's values, one layer file per layer, each record's parts where the config puts them, every
file a regular file inside the bundle folder (no path in a manifest leads out of it), file sizes that
hold the regions, and a resident header whose tensors have the shapes the config implies. Whatever
passes here cannot make the reader loop without end, allocate beyond its files or index past them.

To extend the format, add its keys to the tables below (unknown keys are accepted and ignored), and
the relation to the rest, if any, to `check_manifest`."""

from __future__ import annotations

import json
import math
from pathlib import Path

from flashllm.bundle import format as fmt
from flashllm.bundle.format import FORMAT, MANIFEST, RECORD_PARTS, RESIDENT, is_record_tensor
from flashllm.errors import FlashLLMError
from flashllm.models import DTYPES, get_family
from flashllm.sources.checks import CONFIG, Bool, Dict, Field, Int, List, Str, check, check_config, inside, show
from flashllm.sources.hf import SAFETENSORS_DTYPES

READABLE_VERSIONS = getattr(fmt, "READABLE_VERSIONS", (fmt.FORMAT_VERSION,))
QUANTIZED = getattr(fmt, "QUANTIZED", ())  # kinds of quantized parts and resident tensors (format 2)
FLOATS = ("F32", "F16", "BF16")  # safetensors dtypes the model computes with
MAX_HEADER = 100 << 20  # safetensors' own bound on a header
# files read by their fixed names (the tokenizer's, the predictors'): each, where present, must be inside too
READ_BY_NAME = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                "predictors.json", "predictors.safetensors")

PART = Dict({"name": Str(*RECORD_PARTS), "offset": Int(0), "values": Int(1),
             "kind": Field("str", required=False, choices=QUANTIZED)})
REGION = Dict({"name": Str(), "offset": Int(0), "stride": Int(1), "count": Int(1), "parts": List(PART, min_items=1)})
LAYER = Dict({"file": Field("file"), "bytes": Int(0), "useful_bytes": Int(0), "sha256": Str(),
              "regions": List(REGION, min_items=1)})
MANIFEST_TABLE = Dict({
    "family": Str(), "model_type": Str(), "config": CONFIG,
    "dtype": Str(*DTYPES),  # the float parts' dtype
    "weights": Str(required=False),  # what convert was asked for (format 2)
    "layout": Str("bundled", "split"),
    "alignment": Int(1, required=False),
    "tokenizer": Field("file", required=False, null=True),
    "source": Dict({"name": Str(), "size": Int(0)}),
    "resident": Dict({"file": Field("file"), "bytes": Int(0), "sha256": Str(),
                      "kinds": Dict(values=Field("str", choices=QUANTIZED), required=False, null=True)}),
    "ffn": Dict({"gated": Bool(), "activation": Str(), "d": Int(1), "n_ff": Int(1), "has_up_bias": Bool(),
                 "record_parts": List(Field("list", items=(Str(*RECORD_PARTS), Int(1)))),
                 "layers": List(LAYER, min_items=1)}),
    "sizes": Dict({"resident_bytes": Int(0), "ffn_bytes": Int(1), "ffn_useful_bytes": Int(0),
                   "padding_bytes": Int(0), "total_bytes": Int(1)}),
    "files": List(Dict({"file": Field("file"), "bytes": Int(0), "sha256": Str()}), required=False),
})
TENSOR = Dict({"dtype": Str(*SAFETENSORS_DTYPES), "shape": List(Int(0)), "data_offsets": List(items=(Int(0), Int(0)))})


def load_manifest(folder: Path, files: bool = True) -> dict:
    """manifest.json parsed and checked (`check_manifest`); one-line errors for anything wrong."""
    inside(folder, MANIFEST, f"{folder}:", must_exist=False)
    try:
        manifest = json.loads((folder / MANIFEST).read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise FlashLLMError(f"{folder}: unreadable manifest ({e})") from None
    check_manifest(folder, manifest, files)
    return manifest


def check_manifest(folder: Path, manifest, files: bool = True) -> None:
    """Every field of the manifest, its claims against each other and, with `files`, against the files
    (sizes, the resident header). Without `files` (verify, which reports missing and damaged files
    itself) a missing file or a wrong size passes, but a path outside the folder still does not."""
    path = folder / MANIFEST
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FlashLLMError(f"{folder}: not a flashllm bundle")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise FlashLLMError(f"{folder}: bundle format {show(manifest.get('format_version'))} is not supported "
                            f"(this flashllm reads {', '.join(map(str, READABLE_VERSIONS))}); convert again")
    check(manifest, MANIFEST_TABLE, f"{path}:", {"folder": folder, "files": files})
    try:
        family = get_family(manifest["family"])
    except FlashLLMError as e:
        raise FlashLLMError(f"{path}: family: {e}") from None
    raw, ffn = manifest["config"], manifest["ffn"]
    if get_family(raw.get("model_type", manifest["model_type"])) is not family:
        raise FlashLLMError(f"{path}: config.model_type {show(raw.get('model_type'))} is not of the {family.name} "
                            f"family")
    n_layers = len(ffn["layers"])  # bounded by the manifest's size: checked before anything loops over layers
    if raw.get("num_hidden_layers") != n_layers:
        raise FlashLLMError(f"{path}: config.num_hidden_layers is {show(raw.get('num_hidden_layers'))}, but "
                            f"ffn.layers lists {n_layers} layer files")
    try:
        config = family.config.from_hf(raw)
    except (TypeError, ValueError, KeyError, ZeroDivisionError, AttributeError) as e:
        raise FlashLLMError(f"{path}: config does not describe a usable {family.name} model ({e})") from None
    check_config(config, f"{path}: config")
    spec = family.model.ffn_spec(config)
    for key in ("d", "n_ff", "gated", "activation", "has_up_bias"):
        if ffn[key] != getattr(spec, key):
            raise FlashLLMError(f"{path}: ffn.{key} is {show(ffn[key])}, the config implies {show(getattr(spec, key))}")
    if [tuple(p) for p in ffn["record_parts"]] != list(spec.parts):
        raise FlashLLMError(f"{path}: ffn.record_parts is {ffn['record_parts']}, the config implies "
                            f"{[list(p) for p in spec.parts]}")
    itemsize = DTYPES[manifest["dtype"]].itemsize
    first = None
    for i, layer in enumerate(ffn["layers"]):
        kinds = _check_layer(folder, f"{path}: ffn.layers[{i}]", layer, spec, itemsize, files)
        if first is not None and kinds != first:
            raise FlashLLMError(f"{path}: ffn.layers[{i}] stores its parts as {kinds}, layer 0 as {first}")
        first = kinds
    _check_sizes(path, manifest)
    _check_resident(folder, path, manifest, config, files)
    for name in READ_BY_NAME:
        if (folder / name).is_symlink() or (folder / name).exists():
            inside(folder, name, f"{folder}:")


def _part_bytes(part: dict, itemsize: int) -> int:
    kind = part.get("kind")
    return fmt.part_bytes(part["values"], kind, itemsize) if kind else part["values"] * itemsize


def _check_layer(folder: Path, at: str, layer: dict, spec, itemsize: int, files: bool) -> dict:
    """One layer's regions and parts against the FFN's shape and its file; returns part -> kind."""
    widths, names, kinds, extents = dict(spec.parts), [], {}, []
    for j, region in enumerate(layer["regions"]):
        where = f"{at}.regions[{j}]"
        if region["count"] != spec.n_ff:
            raise FlashLLMError(f"{where}.count is {region['count']}, but the FFN has {spec.n_ff} neurons")
        spans = []
        for k, part in enumerate(region["parts"]):
            name = part["name"]
            if name not in widths:
                raise FlashLLMError(f"{where}.parts[{k}].name {name!r} is not a part of this model's records "
                                    f"({', '.join(widths)})")
            if part["values"] != widths[name]:
                raise FlashLLMError(f"{where}.parts[{k}].values is {part['values']}, the config implies {widths[name]}")
            spans.append((part["offset"], part["offset"] + _part_bytes(part, itemsize), f"{where}.parts[{k}]"))
            names.append(name)
            kinds[name] = part.get("kind")
        _disjoint(spans, region["stride"], "the record's stride")
        extents.append((region["offset"], region["offset"] + region["stride"] * region["count"], where))
    if sorted(names) != sorted(widths):
        raise FlashLLMError(f"{at}: its records hold {names}, the model's records hold {list(widths)}")
    _disjoint(extents, layer["bytes"], "the layer file's bytes")
    if files:
        path = inside(folder, layer["file"], f"{at}.file")
        size = path.stat().st_size
        if size != layer["bytes"]:
            raise FlashLLMError(f"{at}.file {layer['file']} has {size} bytes, the manifest says {layer['bytes']}; "
                                f"run `flashllm verify {folder}`")
    return kinds


def _disjoint(spans: list[tuple[int, int, str]], limit: int, what: str) -> None:
    """Byte ranges [start, stop) that must not overlap and must end within `limit` (named by `what`)."""
    end, previous = 0, None
    for start, stop, where in sorted(spans):
        if start < end:
            raise FlashLLMError(f"{where} overlaps {previous.rsplit(': ', 1)[-1]}")
        if stop > limit:
            raise FlashLLMError(f"{where} ends at byte {stop}, beyond {what} {limit}")
        end, previous = stop, where


def _check_sizes(path: Path, manifest: dict) -> None:
    sizes = manifest["sizes"]
    layers = sum(layer["bytes"] for layer in manifest["ffn"]["layers"])
    claims = (("ffn_bytes", layers, "the layer files' bytes add up to"),
              ("resident_bytes", manifest["resident"]["bytes"], "resident.bytes is"),
              ("total_bytes", sizes["resident_bytes"] + sizes["ffn_bytes"], "resident and FFN bytes add up to"))
    for key, value, what in claims:
        if sizes[key] != value:
            raise FlashLLMError(f"{path}: sizes.{key} is {sizes[key]}, but {what} {value}")


def _check_resident(folder: Path, path: Path, manifest: dict, config, files: bool) -> None:
    """The resident file is the one the reader reads, and holds every tensor the config implies."""
    entry = manifest["resident"]
    resident = inside(folder, entry["file"], f"{path}: resident.file", must_exist=files)
    if resident != (folder.resolve() / RESIDENT).resolve():
        raise FlashLLMError(f"{path}: resident.file {show(entry['file'])} is not {RESIDENT}, the file flashllm reads")
    if not files:
        return
    if resident.stat().st_size != entry["bytes"]:
        raise FlashLLMError(f"{path}: {RESIDENT} has {resident.stat().st_size} bytes, the manifest says "
                            f"{entry['bytes']}; run `flashllm verify {folder}`")
    header, _ = read_safetensors_header(resident)
    kinds = entry.get("kinds") or {}
    for name, shape in config.expected_shapes().items():
        if is_record_tensor(name):
            continue
        tensor = header.get(name)
        if tensor is None:
            raise FlashLLMError(f"{resident}: tensor {name} is missing (the manifest's config implies {list(shape)})")
        quantized = name in kinds and len(shape) == 2
        want = [shape[0], fmt.part_bytes(shape[1], kinds[name], 1)] if quantized else list(shape)
        if tensor["shape"] != want:
            raise FlashLLMError(f"{resident}: tensor {name} has shape {tensor['shape']}, the manifest's config "
                                f"implies {want}")
        if tensor["dtype"] not in (("U8",) if quantized else FLOATS):
            raise FlashLLMError(f"{resident}: tensor {name} has dtype {tensor['dtype']}, not a float dtype")


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header, checked: its length within the file, every tensor's dtype, shape and
    data offsets consistent and inside the file. Returns (header, where the data starts)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or not 2 <= n <= min(size - 8, MAX_HEADER):
                raise ValueError(f"a header of {n} bytes does not fit in a file of {size} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError, RecursionError) as e:
        raise FlashLLMError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise FlashLLMError(f"{path}: the safetensors header is {show(header)}, not an object")
    data_bytes = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            check(entry, Dict(values=Str()), f"{path}: __metadata__")
            continue
        check(entry, TENSOR, f"{path}: tensor {name}")
        begin, end = entry["data_offsets"]
        need = math.prod(entry["shape"]) * SAFETENSORS_DTYPES[entry["dtype"]].itemsize
        if not begin <= end <= data_bytes or end - begin != need:
            raise FlashLLMError(f"{path}: tensor {name} has data_offsets [{begin}, {end}], but its shape needs "
                                f"{need} bytes within the {data_bytes} bytes of data; run `flashllm verify`")
    return header, 8 + n
