"""Reading a bundle folder by its manifest (never by its name), and opening any model path:
a bundle, a Hugging Face folder or a GGUF file."""

from __future__ import annotations

from pathlib import Path

import torch

from flashllm.bundle.format import (FORMAT, MANIFEST, READABLE_VERSIONS, RECORD_PARTS, RESIDENT, RecordLayout,
                                    record_layout)
from flashllm.models.qrows import Int8Groups, QRows, dequantize_rows, from_records
from flashllm.bundle.schema import load_manifest
from flashllm.disk.reader import RecordRegion
from flashllm.errors import FlashLLMError
from flashllm.models import DTYPES, get_family
from flashllm.sources import Source, open_source
from flashllm.sources.checks import inside
from flashllm.sources.hf import SAFETENSORS_DTYPES, read_header, tensor_loader
from flashllm.tokenizer import Tokenizer


def is_bundle(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).exists()


class Bundle:
    """A bundle folder opened by its manifest (never by its name)."""

    def __init__(self, folder: Path, files: bool = True):
        self.folder = Path(folder)
        # every field checked once, against the files too (files=False: verify, which reports missing ones)
        self.manifest = load_manifest(self.folder, files)
        if self.manifest.get("format") != FORMAT:
            raise FlashLLMError(f"{self.folder}: not a flashllm bundle")
        if self.manifest.get("format_version") not in READABLE_VERSIONS:
            raise FlashLLMError(f"{self.folder}: bundle format {self.manifest.get('format_version')} is not "
                                f"supported (this flashllm reads {', '.join(map(str, READABLE_VERSIONS))}); convert again")
        self.family = get_family(self.manifest["family"])
        self.config = self.family.config.from_hf(self.manifest["config"])
        self.spec = self.family.model.ffn_spec(self.config)
        self.dtype = DTYPES[self.manifest["dtype"]]
        self.itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.layout = self.manifest["layout"]
        self.kinds: dict[str, str] = dict(self.manifest["resident"].get("kinds") or {})  # quantized resident tensors
        self.part_kinds: dict[str, str] = {p["name"]: p["kind"] for r in self.layers[0]["regions"] for p in r["parts"]
                                           if p.get("kind")} if self.layers else {}
        self.quantized = bool(self.kinds or self.part_kinds)
        # quantized weights are expanded to float32 a block at a time; activations and the KV cache are float32
        self.compute_dtype = torch.float32 if self.quantized else self.dtype

    @property
    def layers(self) -> list[dict]:
        return self.manifest["ffn"]["layers"]

    def layer_path(self, layer: int) -> Path:
        return inside(self.folder, self.layers[layer]["file"], f"layer {layer}", must_exist=False)

    def regions(self, layer: int) -> list[tuple[RecordRegion, list[dict]]]:
        """Each region of a layer as a RecordRegion (for FlashReader) with its parts."""
        path = self.layer_path(layer)
        return [(RecordRegion(path, r["offset"], r["stride"], r["count"], f"layer {layer}"), r["parts"])
                for r in self.layers[layer]["regions"]]

    def _resident_header(self) -> tuple[dict, int]:
        path = self.folder / RESIDENT
        try:
            return read_header(path)
        except (OSError, ValueError) as e:
            raise FlashLLMError(f"{path}: unreadable resident weights ({e}); run `flashllm verify`") from None

    def resident_tensors(self, skip: tuple[str, ...] = (), expand: bool = False, grouped_rows: int | None = None):
        """(name, tensor or QRows) read with pread, so no memory map's pages linger in our resident set;
        a quantized tensor comes as QRows viewing its records (expanded to float32 with `expand`). int8
        matrices of at least `grouped_rows` rows (the LM head) come as Int8Groups, their compute form,
        read a block of rows at a time (never a second whole copy)."""
        path = self.folder / RESIDENT
        header, data_start = self._resident_header()
        for name, entry in header.items():
            if name != "__metadata__" and name not in skip:
                if grouped_rows is not None and not expand and self.kinds.get(name) == "int8" and \
                        entry["shape"][0] >= grouped_rows:
                    yield name, self._grouped(tensor_loader(path, data_start, name, entry), name, entry["shape"][0])
                    continue
                tensor = tensor_loader(path, data_start, name, entry)(None)
                if name in self.kinds:
                    tensor = self._as_rows(name, tensor)
                    tensor = dequantize_rows(tensor) if expand else tensor
                yield name, tensor

    def _grouped(self, load, name: str, n: int, block: int = 4096) -> Int8Groups:
        m = Int8Groups(n, self.config.expected_shapes()[name][1])
        rows = None
        for start in range(0, n, block):
            rows = load(slice(start, min(start + block, n)), out=rows)
            m.write(start, from_records(rows, "int8", m.k))
        return m

    def _as_rows(self, name: str, records: torch.Tensor) -> QRows:
        return from_records(records, self.kinds[name], self.config.expected_shapes()[name][1])

    def embedding_rows(self) -> tuple[RecordRegion, torch.dtype | str] | None:
        """The input embedding table as records of one row each, for reading only the rows of the
        tokens at hand, with their dtype (or quantized kind); None where the table is also the LM head
        (tied), which needs all of it."""
        if getattr(self.config, "tie_word_embeddings", True):
            return None
        header, data_start = self._resident_header()
        entry = header.get("embed.weight")
        if entry is None or len(entry["shape"]) != 2:
            return None
        begin, end = entry["data_offsets"]
        rows = entry["shape"][0]
        return RecordRegion(self.folder / RESIDENT, data_start + begin, (end - begin) // rows, rows, "embeddings"), \
            self.kinds.get("embed.weight", SAFETENSORS_DTYPES[entry["dtype"]])

    @property
    def resident_bytes(self) -> int:
        """Bytes of the resident tensors (the file less its header)."""
        header, _ = self._resident_header()
        return sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k != "__metadata__")

    def record_layout(self, layer: int, parts: tuple[str, ...] | None = None) -> RecordLayout:
        """The typed layout of this layer's records (only the regions holding `parts`; None: all)."""
        return record_layout(self.layer_path(layer), self.layers[layer]["regions"], layer, self.dtype, parts)

    def dense_ffn(self, layer: int, keep_quantized: bool = False) -> dict[str, torch.Tensor | QRows]:
        """All records of a layer read back into dense matrices (canonical names); quantized parts are
        expanded to float32, or kept as QRows (down as its columns) with `keep_quantized`."""
        weights = {}
        layout = self.record_layout(layer)
        column = 0
        rows = torch.empty(self.spec.n_ff, layout.record_bytes, dtype=torch.uint8)  # [n_ff, record bytes]
        for region in layout.regions:
            with open(region.path, "rb") as f:
                f.seek(region.offset)
                blob = f.read(region.stride * region.count)
            if len(blob) != region.stride * region.count:
                raise FlashLLMError(f"layer {layer}: {region.path} is truncated; run `flashllm verify`")
            rows[:, column:column + region.stride] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(
                region.count, region.stride)
            column += region.stride
        for name, part in layout.split(rows).items():
            if isinstance(part, QRows):
                if keep_quantized:
                    weights[f"layers.{layer}.{RECORD_PARTS[name]}"] = part
                    continue
                part = dequantize_rows(part)
            tensor = part.T.contiguous() if name == "down" else part.contiguous()  # down back to [d, n_ff]
            weights[f"layers.{layer}.{RECORD_PARTS[name]}"] = tensor.squeeze(1) if name == "up_bias" else tensor
        return weights


def open_bundle_source(folder: Path):
    """A bundle as a Source, so the dense engine runs from it exactly as from the checkpoint (quantized
    tensors expanded to float32), and converting it keeps its quantized rows where the kind is kept."""
    bundle = Bundle(folder)
    kept: dict[str, QRows] = {}  # the QRows of the tensor being streamed, for `quantized`

    def tensors():
        def whole(tensor):
            return lambda rows: tensor if rows is None else tensor[rows]

        for name, tensor in bundle.resident_tensors():
            if isinstance(tensor, QRows):
                kept.clear()
                kept[name] = tensor
                tensor = dequantize_rows(tensor)
            yield name, tuple(tensor.shape), whole(tensor)
        for layer in range(bundle.config.num_hidden_layers):
            quantized = bundle.dense_ffn(layer, keep_quantized=True)
            for name, tensor in quantized.items():
                if isinstance(tensor, QRows):
                    kept[name] = tensor
                    tensor = dequantize_rows(tensor)
                    tensor = tensor.T.contiguous() if name.endswith("down.weight") else tensor
                yield name, tuple(tensor.shape), whole(tensor)
            for name in quantized:
                kept.pop(name, None)

    def quantized(canonical: str, kind: str, rows: slice | None, columns: bool) -> QRows | None:
        q = kept.get(canonical)
        if q is None or q.kind != kind:
            return None  # quantized from the float values
        return q if rows is None else q[rows]

    precisions = {**bundle.kinds, **{f"layers.{i}.{RECORD_PARTS[p]}": k for i in range(bundle.config.num_hidden_layers)
                                     for p, k in bundle.part_kinds.items()}}
    return Source(bundle.folder, "bundle", bundle.family, bundle.config, Tokenizer.from_folder(bundle.folder),
                  tensors, bundle.manifest["sizes"]["total_bytes"], precisions=precisions, quantized_reader=quantized)


def open_model(path: str | Path) -> Source:
    """A bundle folder, Hugging Face folder or GGUF file, opened for streaming its tensors."""
    path = Path(path).expanduser()
    return open_bundle_source(path) if is_bundle(path) else open_source(path)
