"""The fuzz campaign's inputs (tests/test_fuzz.py, scripts/fuzz.py): a tiny GGUF written with gguf's
GGUFWriter (no transformers), the bundle converted from it with int4 predictors, and the cases: seeded
corruptions of manifests, resident, layer and predictor files, GGUF metadata and header bytes, and
command-line values, each with the outcome it must have."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

VOCAB, D, N_FF, LAYERS, HEADS, KV_HEADS, CONTEXT = 300, 64, 160, 2, 4, 2, 128
ARCH = "llama"
# metadata of the tiny GGUF: key -> (gguf writer method, value)
BASE_META = {
    "llama.block_count": ("uint32", LAYERS), "llama.context_length": ("uint32", CONTEXT),
    "llama.embedding_length": ("uint32", D), "llama.feed_forward_length": ("uint32", N_FF),
    "llama.attention.head_count": ("uint32", HEADS), "llama.attention.head_count_kv": ("uint32", KV_HEADS),
    "llama.rope.freq_base": ("float32", 10000.0), "llama.attention.layer_norm_rms_epsilon": ("float32", 1e-5),
    "llama.vocab_size": ("uint32", VOCAB),
}


# -- the base artifacts --------------------------------------------------------------------------------
def tokenizer_meta(folder: Path) -> dict:
    """GGUF tokenizer metadata (gpt2 byte-level BPE) from a tiny tokenizer.json trained by tests/tiny.py."""
    from tests.tiny import tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer(folder, VOCAB)
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"tokenizer.ggml.model": ("string", "gpt2"), "tokenizer.ggml.tokens": ("array", tokens),
            "tokenizer.ggml.token_type": ("array", [3 if t == "<eos>" else 1 for t in tokens]),
            "tokenizer.ggml.merges": ("array", merges),
            "tokenizer.ggml.eos_token_id": ("uint32", tokens.index("<eos>"))}


def base_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights of a tiny untied Llama by GGUF name (numpy order: [out, in])."""
    rng = np.random.default_rng(seed)
    w = lambda *shape: (rng.standard_normal(shape) * 0.05).astype(np.float32)  # noqa: E731
    hd = D // HEADS
    tensors = {"token_embd.weight": w(VOCAB, D), "output_norm.weight": 1 + w(D), "output.weight": w(VOCAB, D)}
    for i in range(LAYERS):
        tensors |= {f"blk.{i}.attn_norm.weight": 1 + w(D), f"blk.{i}.ffn_norm.weight": 1 + w(D),
                    f"blk.{i}.attn_q.weight": w(HEADS * hd, D), f"blk.{i}.attn_k.weight": w(KV_HEADS * hd, D),
                    f"blk.{i}.attn_v.weight": w(KV_HEADS * hd, D), f"blk.{i}.attn_output.weight": w(D, HEADS * hd),
                    f"blk.{i}.ffn_gate.weight": w(N_FF, D), f"blk.{i}.ffn_up.weight": w(N_FF, D),
                    f"blk.{i}.ffn_down.weight": w(D, N_FF)}
    return tensors


def write_gguf(path: Path, meta: dict, tensors: dict[str, np.ndarray], arch: str = ARCH) -> Path:
    """A GGUF file of these metadata (key -> (writer method, value); None drops a key) and tensors."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    for key, entry in meta.items():
        if entry is None:
            continue
        kind, value = entry
        if kind == "array":
            writer.add_array(key, value)
        else:
            getattr(writer, f"add_{kind}")(key, value)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@dataclass
class Base:
    """Everything a case starts from; a case works on its own copies."""

    root: Path
    gguf: Path  # the tiny GGUF
    bundle: Path  # converted from it (float16, bundled), with int4 predictors
    meta: dict  # the GGUF's metadata (writer form)
    tensors: dict[str, np.ndarray]
    text: Path  # a text file for perplexity
    outside: Path  # a folder beside the bundles whose files no case may open


def build_base(root: Path) -> Base:
    from flashllm.bundle.writer import convert
    from flashllm.sparsity.train import train_predictors

    root.mkdir(parents=True, exist_ok=True)
    meta = BASE_META | tokenizer_meta(root / "tok")
    tensors = base_tensors()
    gguf_path = write_gguf(root / "tiny.gguf", meta, tensors)
    bundle = root / "bundle"
    convert(gguf_path, bundle, dtype="float16")
    train_predictors(bundle, tokens=512, eval_tokens=0, context=64, epochs=1, sparsity=0.5)
    text = root / "text.txt"
    text.write_text("The assignment statement binds names to values. " * 12)
    outside = root / "outside"
    outside.mkdir()
    shutil.copy(bundle / "ffn" / "layer_000.bin", outside / "layer_000.bin")
    shutil.copy(bundle / "resident.safetensors", outside / "resident.safetensors")
    shutil.copy(bundle / "tokenizer.json", outside / "tokenizer.json")
    return Base(root, gguf_path, bundle, meta, tensors, text, outside)


# -- cases ---------------------------------------------------------------------------------------------
@dataclass
class Case:
    """A command line (with {bundle}, {gguf}, {text}, {out}, {outside} filled in) run on a fresh copy of
    the base after `setup(case_dir, base)`. expect: "error" (exit 1, one `error:` line holding every
    fragment), "ok" (exit 0), "usage" (click's exit 2 naming the option) or "any" (ok or a one-line error)."""

    name: str
    args: list[str]
    setup: Callable[[Path, Base], None] | None = None
    expect: str = "any"
    fragments: tuple[str, ...] = ()
    timeout: float = 60.0


COMMANDS = {  # how a corrupted bundle is used: every path that reads it
    "info": ["info", "{bundle}"],
    "flash": ["generate", "{bundle}", "The", "-n", "2", "-b", "64MB", "--stats", "none"],
    "dense": ["generate", "{bundle}", "The", "-n", "2", "--stats", "none"],
    "perplexity": ["perplexity", "{bundle}", "{text}", "--context", "16", "--max-tokens", "40"],
    "verify": ["verify", "{bundle}"],
    "oracle": ["perplexity", "{bundle}", "{text}", "--mode", "oracle", "--context", "16", "--max-tokens", "40",
               "-b", "64MB"],
}


def edit_manifest(change: Callable[[dict], None]) -> Callable[[Path, Base], None]:
    def setup(case_dir: Path, base: Base) -> None:
        path = case_dir / "bundle" / "manifest.json"
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))
    return setup


def edit_json(name: str, change: Callable[[dict], object]) -> Callable[[Path, Base], None]:
    """Edit a JSON file of the bundle (change returns a replacement document, or None to keep it)."""
    def setup(case_dir: Path, base: Base) -> None:
        path = case_dir / "bundle" / name
        doc = json.loads(path.read_text())
        new = change(doc)
        path.write_text(json.dumps(doc if new is None else new))
    return setup


def key_paths(doc, prefix=()) -> list[tuple]:
    """Every key path of a JSON document (lists: their first and last items)."""
    paths = []
    items = doc.items() if isinstance(doc, dict) else \
        ([(0, doc[0])] + ([(len(doc) - 1, doc[-1])] if len(doc) > 1 else []) if isinstance(doc, list) and doc else [])
    for key, value in items:
        paths.append(prefix + (key,))
        if isinstance(value, (dict, list)):
            paths.extend(key_paths(value, prefix + (key,)))
    return paths


def _parent(doc, path):
    for key in path[:-1]:
        doc = doc[key]
    return doc


WRONG_TYPES = ["a string", [1, 2], {"a": 1}, None, True, 3.5, -7, 10 ** 18]


def out_of_range(value, rng: random.Random):
    if isinstance(value, bool):
        return rng.choice([0, 1, "true"])
    if isinstance(value, int):
        return rng.choice([-1, 0, value + 1, value * 7 + 3, 2 ** 40, 2 ** 63])
    if isinstance(value, float):
        return rng.choice([math.nan, math.inf, -value, 0.0, 1e308])
    if isinstance(value, str):
        return rng.choice(["", "bogus", "../" * 3 + value, "/etc/passwd", value + "\0", "x" * 5000])
    if isinstance(value, list):
        return rng.choice([[], value[:1], value + value[-1:], [value]])
    return rng.choice([{}, {"extra": 1}])


def mutate(doc: dict, path: tuple, how: str, rng: random.Random) -> None:
    parent, key = _parent(doc, path), path[-1]
    if how == "missing":
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    elif how == "type":
        parent[key] = copy.deepcopy(rng.choice([v for v in WRONG_TYPES if type(v) is not type(parent[key])]))
    else:
        parent[key] = out_of_range(parent[key], rng)


def generic_cases(base: Base, rng: random.Random, long: bool) -> list[Case]:
    """Every key of the manifest and of predictors.json: missing, of another type, out of range (one of
    the three per key, drawn; all three in the long run), each through one of the reading commands."""
    cases = []
    manifest = json.loads((base.bundle / "manifest.json").read_text())
    settings = json.loads((base.bundle / "predictors.json").read_text())
    commands = list(COMMANDS)
    for name, doc, depth in (("manifest.json", manifest, 8), ("predictors.json", settings, 2)):
        for path in key_paths(doc):
            if len(path) > depth or (path[0] in ("source", "report", "corpus") and len(path) > 1):
                continue
            for how in (["missing", "type", "range"] if long else [rng.choice(["missing", "type", "range"])]):
                sub = random.Random(rng.random())
                command = rng.choice(commands if name == "manifest.json" else ["flash", "oracle"])

                def change(doc, path=path, how=how, sub=sub):
                    mutate(doc, path, how, sub)

                label = ".".join(map(str, path))
                cases.append(Case(f"{name}:{label}:{how}:{command}", COMMANDS[command], edit_json(name, change)))
    return cases


def flip_bytes(name: str, positions: list[int], value: int | None = None) -> Callable[[Path, Base], None]:
    def setup(case_dir: Path, base: Base) -> None:
        path = case_dir / name
        data = bytearray(path.read_bytes())
        for pos in positions:
            data[pos % len(data)] = value if value is not None else data[pos % len(data)] ^ 0xFF
        path.write_bytes(bytes(data))
    return setup


def gguf_meta(**changes) -> Callable[[Path, Base], None]:
    """The tiny GGUF rewritten with metadata changed (key -> (method, value), or None to drop it)."""
    def setup(case_dir: Path, base: Base) -> None:
        meta = dict(base.meta)
        for key, entry in changes.items():
            meta[key.replace("__", ".")] = entry
        write_gguf(case_dir / "tiny.gguf", meta, base.tensors)
    return setup


def gguf_tensors(drop: tuple[str, ...] = (), add: dict | None = None) -> Callable[[Path, Base], None]:
    def setup(case_dir: Path, base: Base) -> None:
        tensors = {k: v for k, v in base.tensors.items() if k not in drop} | (add or {})
        write_gguf(case_dir / "tiny.gguf", base.meta, tensors)
    return setup


# -- named cases: the list, each with the outcome it must have ----------------------------------
def _set(path: str, value) -> Callable[[dict], None]:
    """A change of the document at a dotted path (list indices as numbers)."""
    keys = [int(k) if k.lstrip("-").isdigit() else k for k in path.split(".")]

    def change(doc):
        parent = _parent(doc, keys)
        if value is DROP:
            del parent[keys[-1]]
        else:
            parent[keys[-1]] = value(parent[keys[-1]]) if callable(value) else value
    return change


DROP = object()
L0 = "ffn.layers.0"


def manifest_case(name: str, path: str, value, command: str = "info", *fragments: str) -> Case:
    return Case(f"manifest:{name}:{command}", COMMANDS[command], edit_manifest(_set(path, value)), "error", fragments)


def predictors_case(name: str, path: str, value, *fragments: str, command: str = "flash") -> Case:
    return Case(f"predictors:{name}", COMMANDS[command], edit_json("predictors.json", _set(path, value)), "error",
                fragments)


def _absolute_layer(case_dir: Path, base: Base) -> None:
    edit_manifest(_set(f"{L0}.file", str(base.outside / "layer_000.bin")))(case_dir, base)


def _relative_out(key: str, target: str) -> Callable[[Path, Base], None]:
    """The manifest's `key` set to a ../.. path that does reach the outside folder's copy of `target`."""
    def setup(case_dir: Path, base: Base) -> None:
        relative = os.path.relpath(base.outside / target, case_dir / "bundle")
        edit_manifest(_set(key, relative))(case_dir, base)
    return setup


def _manifest_elsewhere(case_dir: Path, base: Base) -> None:
    shutil.move(case_dir / "bundle" / "manifest.json", case_dir / "elsewhere.json")
    (case_dir / "bundle" / "manifest.json").symlink_to(case_dir / "elsewhere.json")


def _resident_linked_inside(case_dir: Path, base: Base) -> None:
    """A symbolic link that stays inside the bundle is followed: not every link is refused."""
    bundle = case_dir / "bundle"
    shutil.move(bundle / "resident.safetensors", bundle / "ffn" / "resident.bin")
    (bundle / "resident.safetensors").symlink_to("ffn/resident.bin")


def _replace_with_dir(case_dir: Path, base: Base) -> None:
    path = case_dir / "bundle" / "ffn" / "layer_001.bin"
    path.unlink()
    path.mkdir()


def _link_outside(name: str, target: str) -> Callable[[Path, Base], None]:
    def setup(case_dir: Path, base: Base) -> None:
        path = case_dir / "bundle" / name
        path.unlink()
        path.symlink_to(base.outside / target)
    return setup


def _resident_header(length: int | None = None, text: bytes | None = None) -> Callable[[Path, Base], None]:
    def setup(case_dir: Path, base: Base) -> None:
        path = case_dir / "bundle" / "resident.safetensors"
        data = bytearray(path.read_bytes())
        n = int.from_bytes(data[:8], "little")
        if text is not None:
            data[8:8 + n] = text.ljust(n)[:n]
        if length is not None:
            data[:8] = length.to_bytes(8, "little")
        path.write_bytes(bytes(data))
    return setup


def _predictor_tensors(shape_of: Callable[[str, tuple], tuple]) -> Callable[[Path, Base], None]:
    """predictors.safetensors rewritten with each tensor of the shape shape_of(name, shape) gives."""
    def setup(case_dir: Path, base: Base) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        path = case_dir / "bundle" / "predictors.safetensors"
        tensors = load_file(str(path))
        save_file({k: torch.zeros(shape_of(k, tuple(v.shape)), dtype=v.dtype) for k, v in tensors.items()}, str(path),
                  metadata={"format": "flashllm-predictors"})
    return setup


def _nested(depth: int) -> Callable[[Path, Base], None]:
    def setup(case_dir: Path, base: Base) -> None:
        (case_dir / "bundle" / "manifest.json").write_text("[" * depth + "]" * depth)
    return setup


def named_cases() -> list[Case]:
    m, p = manifest_case, predictors_case
    nan, inf = float("nan"), float("inf")
    cases = [
        # a key missing, a wrong type, a dtype this format has not got
        m("no-ffn", "ffn", DROP, "info", "ffn is missing"),
        m("no-config-heads", "config.num_attention_heads", DROP, "dense"),
        m("config-list", "config", [1, 2], "flash", "config is a list", "must be an object"),
        m("layers-string", "ffn.layers", "ffn/layer_000.bin", "info", "ffn.layers", "must be a list"),
        m("stride-string", f"{L0}.regions.0.stride", "384", "flash", "stride", "must be an integer"),
        m("dtype-int8", "dtype", "int8", "info", "dtype 'int8' is not supported"),
        m("dtype-list", "dtype", ["float16"], "dense", "dtype", "must be a string"),
        m("format-version-99", "format_version", 99, "info", "bundle format 99 is not supported"),
        m("layers-empty", "ffn.layers", [], "flash", "ffn.layers", "at least 1"),
        # values that cannot be right
        m("layers-1-of-2", "config.num_hidden_layers", 1, "flash", "num_hidden_layers is 1", "2 layer files"),
        m("layers-3-of-2", "config.num_hidden_layers", 3, "dense", "num_hidden_layers is 3"),
        m("layers-huge", "config.num_hidden_layers", 10 ** 12, "perplexity", "num_hidden_layers"),
        m("hidden-0", "config.hidden_size", 0, "flash", "hidden_size is 0"),
        m("hidden-65", "config.hidden_size", 65, "dense"),
        m("kv-heads-3", "config.num_key_value_heads", 3, "flash", "does not divide"),
        m("heads-7", "config.num_attention_heads", 7, "dense"),
        m("head-dim-odd", "config.head_dim", 15, "info", "head_dim"),
        m("vocab-100", "config.vocab_size", 100, "flash", "embed.weight"),
        m("vocab-0", "config.vocab_size", 0, "dense", "vocab_size is 0"),
        m("n-ff-161", "config.intermediate_size", 161, "flash"),
        m("eps-nan", "config.rms_norm_eps", nan, "dense", "rms_norm_eps"),
        m("eps-negative", "config.rms_norm_eps", -1e-5, "flash", "rms_norm_eps"),
        m("rope-inf", "config.rope_theta", inf, "perplexity", "rope_theta"),
        m("rope-yarn", "config.rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "dense", "yarn"),
        m("context-0", "config.max_position_embeddings", 0, "flash", "max_position_embeddings"),
        m("context-huge", "config.max_position_embeddings", 2 ** 40, "dense", "max_position_embeddings"),
        m("stride-0", f"{L0}.regions.0.stride", 0, "flash", "stride is 0"),
        m("stride-short", f"{L0}.regions.0.stride", 383, "flash", "stride"),
        m("stride-huge", f"{L0}.regions.0.stride", 2 ** 50, "dense"),
        m("count-159", f"{L0}.regions.0.count", 159, "flash", "count is 159"),
        m("offset-past-file", f"{L0}.regions.0.offset", 10 ** 9, "flash", "beyond"),
        m("part-values", f"{L0}.regions.0.parts.0.values", 63, "dense", "values is 63"),
        m("part-overlap", f"{L0}.regions.0.parts.1.offset", 64, "flash", "overlaps"),
        m("part-unknown", f"{L0}.regions.0.parts.0.name", "up_bias", "flash"),
        m("part-kind", f"{L0}.regions.0.parts.0.kind", "int3", "flash", "kind"),
        m("total-bytes-0", "sizes.total_bytes", 0, "flash", "total_bytes"),
        m("ffn-bytes-wrong", "sizes.ffn_bytes", 1, "info", "ffn_bytes"),
        m("d-wrong", "ffn.d", 32, "info", "ffn.d"),
        m("family-mamba", "family", "mamba", "info", "mamba", "not supported"),
        m("family-opt", "family", "opt", "info"),
        # paths out of the bundle: refused before anything is opened
        m("layer-dotdot", f"{L0}.file", "../../outside/layer_000.bin", "info", "outside the bundle"),
        *[Case(f"manifest:layer-dotdot-reaching:{command}", COMMANDS[command],
               _relative_out(f"{L0}.file", "layer_000.bin"), "error", ("outside the bundle",))
          for command in ("info", "flash", "dense", "perplexity", "verify", "oracle")],
        Case("manifest:layer-absolute", COMMANDS["dense"], _absolute_layer, "error", ("outside the bundle",)),
        Case("manifest:resident-dotdot", COMMANDS["flash"], _relative_out("resident.file", "resident.safetensors"),
             "error", ("outside the bundle",)),
        Case("manifest:tokenizer-dotdot", COMMANDS["dense"], _relative_out("tokenizer", "tokenizer.json"),
             "error", ("outside the bundle",)),
        m("tokenizer-absolute", "tokenizer", "/etc/hostname", "info", "outside the bundle"),
        m("layer-nul", f"{L0}.file", "ffn/layer_000.bin\0", "info"),
        Case("files:layer-symlink-out", COMMANDS["flash"], _link_outside("ffn/layer_000.bin", "layer_000.bin"),
             "error", ("outside the bundle",)),
        Case("files:resident-symlink-out", COMMANDS["dense"], _link_outside("resident.safetensors",
                                                                            "resident.safetensors"),
             "error", ("outside the bundle",)),
        Case("files:tokenizer-symlink-out", COMMANDS["flash"], _link_outside("tokenizer.json", "tokenizer.json"),
             "error", ("outside the bundle",)),
        Case("files:tokenizer-config-symlink-out", COMMANDS["dense"],
             _link_outside("tokenizer_config.json", "tokenizer.json"), "error", ("outside the bundle",)),
        Case("files:manifest-symlink-out", COMMANDS["info"], _manifest_elsewhere, "error", ("outside the bundle",)),
        Case("files:resident-symlink-in", COMMANDS["flash"], _resident_linked_inside, "ok"),
        # files missing, of the wrong kind or size
        Case("files:layer-missing", COMMANDS["flash"], lambda d, b: (d / "bundle/ffn/layer_001.bin").unlink(),
             "error", ("layer_001.bin", "missing")),
        Case("files:layer-missing-verify", COMMANDS["verify"], lambda d, b: (d / "bundle/ffn/layer_001.bin").unlink(),
             "error", ("layer 1", "missing")),
        Case("files:layer-directory", COMMANDS["dense"], _replace_with_dir, "error", ("not a regular file",)),
        Case("files:layer-directory-verify", COMMANDS["verify"], _replace_with_dir, "error", ("not a regular file",)),
        Case("files:layer-truncated", COMMANDS["flash"], lambda d, b: _truncate(d / "bundle/ffn/layer_000.bin", 1000),
             "error", ("bytes",)),
        Case("files:resident-header-huge", COMMANDS["flash"], _resident_header(length=2 ** 62), "error",
             ("resident.safetensors", "does not fit")),
        Case("files:resident-header-file-size", COMMANDS["info"], _resident_header(length=10 ** 5), "error",
             ("resident.safetensors",)),
        Case("files:resident-header-garbage", COMMANDS["dense"], _resident_header(text=b"{\"embed.weight\": [1,"),
             "error", ("resident.safetensors",)),
        Case("files:manifest-nested", COMMANDS["info"], _nested(100_000), "error", ("unreadable manifest",)),
        Case("files:manifest-binary", COMMANDS["flash"],
             lambda d, b: (d / "bundle/manifest.json").write_bytes(b"\xff\xfe\x00garbage"), "error", ("manifest",)),
        Case("files:manifest-list", COMMANDS["info"], lambda d, b: (d / "bundle/manifest.json").write_text("[]"),
             "error", ("not a flashllm bundle",)),
        # predictors: shape, length and type against the bundle
        p("thresholds-3", "activation_thresholds", lambda v: v + v[:1], "activation_thresholds", "one per layer"),
        p("thresholds-strings", "activation_thresholds", ["0.1", "0.2"], "must be a number"),
        p("thresholds-nan", "decision_thresholds.0", nan, "decision_thresholds"),
        p("thresholds-dict", "decision_thresholds", {"0": 0.1}, "must be a list"),
        p("group-0", "int4_group", 0, "int4_group"),
        p("group-48", "int4_group", 48, "int4_group"),
        p("foreign-n-ff", "n_ff", 1536, "n_ff", "another model"),
        p("foreign-layers", "ranks", [0] * 30, "ranks", "one per layer"),
        p("foreign-rows", "int4_rows", 3072, "int4_rows"),
        p("sparsity-2", "sparsity", 2.0, "sparsity"),
        p("foreign-relu", "gated", False, "gated", "another model"),
        p("kind-bogus", "kind", "dense", "kind"),
        p("window-ragged", "window_stats.distinct.1", lambda v: v[:3], "window_stats"),
        p("window-negative", "window_stats.distinct.0.0", -5, "window_stats"),
        p("recall-key", "decision_table", {"high": [0.1, 0.2]}, "decision_table", command="flash"),
        Case("predictors:list", COMMANDS["flash"], edit_json("predictors.json", lambda doc: [doc]), "error",
             ("predictor format",)),
        Case("predictors:foreign-tensors", COMMANDS["flash"],
             _predictor_tensors(lambda k, s: (s[0] * 2,) + s[1:]), "error", ("another model",)),
        Case("predictors:header-huge", COMMANDS["oracle"], flip_bytes("bundle/predictors.safetensors", [7], 0x40),
             "error", ("predictors.safetensors",)),
    ]
    return cases + gguf_cases() + cli_cases()


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def gguf_cases() -> list[Case]:
    dense = ["generate", "{gguf}", "The", "-n", "2", "--stats", "none"]
    convert = ["convert", "{gguf}", "{out}", "--dtype", "float16"]
    u32, f32 = (lambda v: ("uint32", v)), (lambda v: ("float32", v))

    def g(name, fragments, command=dense, **meta):
        return Case(f"gguf:{name}", command, gguf_meta(**meta), "error", fragments)

    return [
        g("head-count-0", ("head_count is 0",), llama__attention__head_count=u32(0)),
        g("head-count-0-convert", ("head_count is 0",), convert, llama__attention__head_count=u32(0)),
        g("head-count-string", ("must be an integer",), llama__attention__head_count=("string", "4")),
        g("context-0", ("context_length is 0",), convert, llama__context_length=u32(0)),
        g("vocab-0", ("vocab_size is 0",), llama__vocab_size=u32(0)),
        g("vocab-200", ("tokens",), convert, llama__vocab_size=u32(200)),
        g("rope-inf", ("freq_base",), llama__rope__freq_base=f32(float("inf"))),
        g("eps-nan", ("layer_norm_rms_epsilon",), convert, llama__attention__layer_norm_rms_epsilon=f32(float("nan"))),
        g("block-count-3", ("block_count is 3",), llama__block_count=u32(3)),
        g("block-count-huge", ("block_count",), convert, llama__block_count=("uint64", 10 ** 12)),
        g("kv-heads-3", ("does not divide",), llama__attention__head_count_kv=u32(3)),
        g("key-length-15", ("head_dim",), llama__attention__key_length=u32(15)),
        g("embedding-32", ("shape",), convert, llama__embedding_length=u32(32)),
        g("no-ffn-length", ("feed_forward_length is missing",), llama__feed_forward_length=None),
        g("bos-huge", ("bos_token_id",), **{"tokenizer.ggml.bos_token_id": u32(10 ** 6)}),
        g("tokens-int", ("tokenizer.ggml.tokens",), **{"tokenizer.ggml.tokens": ("array", [1, 2, 3])}),
        g("token-type-short", ("token_type",), **{"tokenizer.ggml.token_type": ("array", [1, 1])}),
        Case("gguf:tensor-missing", convert, gguf_tensors(drop=("blk.1.ffn_down.weight",)), "error", ("missing",)),
        Case("gguf:tensor-extra-block", dense, gguf_tensors(add={"blk.2.attn_norm.weight": np.ones(D, np.float32)}),
             "error", ("block_count",)),
        Case("gguf:flip-version", dense, flip_bytes("tiny.gguf", [4]), "error", ("tiny.gguf",)),
        Case("gguf:flip-tensor-count", dense, flip_bytes("tiny.gguf", [15]), "error", ("tiny.gguf",)),
        Case("gguf:flip-kv-count", convert, flip_bytes("tiny.gguf", [23]), "error", ("tiny.gguf",)),
        Case("gguf:flip-kv-count-low", dense, flip_bytes("tiny.gguf", [16]), "any"),
        Case("gguf:truncated", dense, lambda d, b: _truncate(d / "tiny.gguf", 3000), "error", ("tiny.gguf",)),
    ]


NON_UTF8 = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes


def cli_cases() -> list[Case]:
    flash = ["generate", "{bundle}", "The", "-n", "2", "-b", "64MB", "--stats", "none"]
    dense = ["generate", "{bundle}", "The", "-n", "2", "--stats", "none"]
    train = ["train-predictor", "{bundle}", "--tokens", "512", "--eval-tokens", "0", "--sparsity", "0.5", "--context", "32"]
    ppl = ["perplexity", "{bundle}", "{text}", "--context", "16", "--max-tokens", "40"]

    def c(name, args, expect="error", *fragments):
        return Case(f"cli:{name}", args, None, expect, fragments)

    return [
        c("version", ["--version"], "ok", "flashllm "),
        c("policy-bogus-dense", dense + ["--policy", "bogus"], "error", "unknown policy 'bogus'"),
        c("policy-bogus-flash", flash + ["--policy", "bogus"], "error", "unknown policy 'bogus'"),
        c("mode-bogus", flash + ["--mode", "bogus"], "error", "unknown mode"),
        c("gate-up-bogus", flash + ["--gate-up", "int3"], "error", "int3"),
        c("gate-up-bundled", flash + ["--gate-up", "int4"], "error", "split layout"),
        c("dots-bogus", flash + ["--dots", "int3"], "error", "unknown --dots 'int3'"),
        c("dots-without-budget", dense + ["--dots", "int8"], "error", "--dots applies to the budgeted engine"),
        c("dots-int8", flash + ["--dots", "int8"], "ok"),
        c("ppl-dots-without-budget", ppl + ["--dots", "int8"], "error", "--dots applies to the budgeted engine"),
        c("stats-bogus", dense + ["--stats", "yaml"], "error", "--stats"),
        c("prompt-not-utf8", ["generate", "{bundle}", NON_UTF8, "-n", "2"], "error", "not valid UTF-8", "0xe9"),
        c("prompt-not-utf8-flash", flash[:2] + [NON_UTF8] + flash[3:], "error", "not valid UTF-8"),
        c("system-not-utf8", dense + ["--chat", "--system", NON_UTF8], "error", "--system is not valid UTF-8"),
        c("model-not-utf8", ["generate", "/nonexistent/" + NON_UTF8, "The"], "error", "no such file"),
        c("prompt-empty", ["generate", "{bundle}", "", "-n", "2"], "error", "empty"),
        c("budget-bogus", flash[:6] + ["lots"] + flash[7:], "error", "lots"),
        c("budget-0", flash[:6] + ["0"] + flash[7:], "error", "budget"),
        c("budget-tiny", flash[:6] + ["1%"] + flash[7:], "error", "minimum"),
        c("max-tokens-0", dense[:3] + ["-n", "0"], "usage", "--max-tokens"),
        c("max-tokens-past-context", dense[:3] + ["-n", "140"], "ok"),
        c("temperature-negative", dense + ["--temperature", "-1"], "usage", "--temperature"),
        c("top-p-2", dense + ["--top-p", "2"], "usage", "--top-p"),
        c("window-0", flash + ["--window", "0"], "usage", "--window"),
        c("dtype-bogus", dense + ["--dtype", "int8"], "error", "int8"),
        c("convert-dtype", ["convert", "{gguf}", "{out}", "--dtype", "int3"], "error", "int3"),
        c("convert-layout", ["convert", "{gguf}", "{out}", "--layout", "zigzag"], "error", "zigzag"),
        c("convert-into-bundle", ["convert", "{bundle}", "{bundle}/inner"], "error", "inside the source"),
        c("train-context-past-model", train[:-1] + ["4096"], "error", "--context 4096: the model's context holds 128"),
        c("train-default-context", train[:-2], "ok", "predictors written"),
        c("train-group-0", train + ["--group", "0"], "error", "--group"),
        c("train-kind-bogus", train + ["--kind", "dense"], "error", "kind"),
        c("train-sparsity-1", train + ["--sparsity", "1.0"], "error", "--sparsity"),
        c("train-recall-0", train + ["--recall", "0"], "error", "--recall"),
        c("ppl-mode-bogus", ppl + ["--mode", "bogus"], "error", "unknown mode"),
        c("ppl-recall-absent", ppl + ["--mode", "predictor", "--recall", "0.5"], "error", "--recall"),
        c("ppl-text-missing", ["perplexity", "{bundle}", "{bundle}/none.txt"], "error", "no such file"),
        c("ppl-text-binary", ["perplexity", "{bundle}", "{bundle}/resident.safetensors"], "error"),
        c("ppl-context-past-model", ppl[:4] + ["4096"], "error", "needs at least 4096"),
        c("ppl-context-past-model-long", ["perplexity", "{bundle}", "builtin:heldout", "--context", "512",
                                          "--max-tokens", "1100"], "error", "the model's context holds 128"),
        c("ppl-context-past-gguf", ["perplexity", "{gguf}", "{text}", "--context", "256"], "error", "--context 256"),
        c("bench-policy-bogus", ["bench", "{bundle}", "--quick", "--policy", "bogus", "-b", "64MB"], "error", "policy"),
        c("bench-strategy-bogus", ["bench", "{bundle}", "--quick", "--strategies", "warp", "-b", "64MB"], "error",
          "warp"),
        c("info-not-a-bundle", ["info", "{text}"], "error"),
    ]


def byte_flip_cases(rng: random.Random, count: int) -> list[Case]:
    """Random bytes of the GGUF's header and metadata, of the manifest and of the resident header flipped."""
    cases = []
    targets = [("tiny.gguf", 0, 4000, ["generate", "{gguf}", "The", "-n", "2", "--stats", "none"]),
               ("bundle/manifest.json", 0, 3000, COMMANDS["flash"]),
               ("bundle/resident.safetensors", 0, 2000, COMMANDS["dense"]),
               ("bundle/predictors.safetensors", 0, 600, COMMANDS["flash"]),
               ("bundle/predictors.json", 0, 3000, COMMANDS["flash"])]
    for i in range(count):
        name, lo, hi, args = rng.choice(targets)
        positions = sorted(rng.randrange(lo, hi) for _ in range(rng.choice([1, 1, 2, 4])))
        value = rng.choice([None, 0, 0xFF, rng.randrange(256)])
        cases.append(Case(f"bytes:{name}:{positions}:{value}", args, flip_bytes(name, positions, value)))
    return cases


def all_cases(base: Base, seed: int, long: bool) -> list[Case]:
    """Named cases (all), generic key cases (a sample in the fast run) and byte flips."""
    rng = random.Random(seed)
    generic = generic_cases(base, rng, long)
    if not long:
        generic = rng.sample(generic, min(24, len(generic)))
    return named_cases() + generic + byte_flip_cases(rng, 120 if long else 8)
