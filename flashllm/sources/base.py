"""A checkpoint opened for streaming (Source) and the table that maps its tensor names to ours."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from flashllm.errors import FlashLLMError
from flashllm.models import Family
from flashllm.models.qrows import QRows, quantize_rows
from flashllm.tokenizer import Tokenizer

# (canonical name, kind, rows, columns) -> the tensor's rows (or, with columns, its columns as rows) as
# QRows of that kind straight from the source's own grid; None where the source has no such grid
QuantizedReader = Callable[[str, str, "slice | None", bool], "QRows | None"]


@dataclass
class Source:
    """A checkpoint opened for streaming: config and tokenizer now, tensors one at a time."""

    path: Path
    kind: str  # "hf", "gguf" or "bundle"
    family: Family
    config: object
    tokenizer: Tokenizer | None
    _tensors: Callable[[], Iterator[tuple[str, tuple, Callable[[slice | None], torch.Tensor]]]] = field(repr=False)
    size_bytes: int = 0
    fixup: Callable[[str, torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    metadata: dict = field(default_factory=dict, repr=False)
    precisions: dict[str, str] = field(default_factory=dict, repr=False)  # canonical -> int4 / int8 / float16
    quantized_reader: QuantizedReader | None = field(default=None, repr=False)

    def precision_of(self, canonical: str) -> str:
        """The precision class of a tensor as stored in the source ("int4", "int8" or "float16")."""
        return self.precisions.get(canonical, "float16")

    def quantized(self, canonical: str, kind: str, load: Callable[[slice | None], torch.Tensor],
                  rows: slice | None = None, columns: bool = False) -> QRows:
        """A tensor's rows (or with `columns`, all its columns, each as a row: the down projection's
        neuron columns) as `kind` rows: from the source's own grid where it has one (GGUF blocks,
        a quantized bundle), else quantized from the float values."""
        q = self.quantized_reader(canonical, kind, rows, columns) if self.quantized_reader else None
        if q is None:
            w = load(None if columns else rows)
            q = quantize_rows(w.T.contiguous() if columns else w, kind)
        elif self.fixup is not None and not columns:  # q/k unpermuting: a permutation of whole rows
            order = self.fixup(canonical, torch.arange(q.n, dtype=torch.float32).unsqueeze(1))[:, 0].long()
            if not torch.equal(order, torch.arange(q.n)):
                q = QRows(q.kind, q.codes[order], q.scales[order], q.mins[order] if q.mins is not None else None)
        return q

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(canonical name, tensor) one at a time; checks names and shapes against the config."""
        for canonical, _, load in self.streams():
            yield canonical, load(None)

    def streams(self) -> Iterator[tuple[str, tuple[int, ...], Callable[[slice | None], torch.Tensor]]]:
        """(canonical name, shape, load) per tensor; load(rows) reads a slice of rows (or all with None),
        so a huge tensor such as the embedding table can be converted a chunk at a time."""
        table = None if self.kind == "bundle" else \
            NameTable(self.family.hf_names if self.kind == "hf" else self.family.gguf_names)
        expected = self.config.expected_shapes()
        seen = set()
        for source_name, shape, load in self._tensors():
            canonical = source_name if table is None else table.map(source_name)
            if canonical is None:
                continue
            if canonical not in expected:
                raise FlashLLMError(f"{self.path}: tensor {source_name} is not part of this {self.family.name} config")
            if tuple(shape) != expected[canonical]:
                raise FlashLLMError(f"{self.path}: tensor {source_name} has shape {tuple(shape)}, "
                                    f"the config implies {expected[canonical]}")
            seen.add(canonical)
            if self.fixup is not None:  # q/k unpermuting: those tensors are always loaded whole
                load = lambda rows, load=load, name=canonical: self.fixup(name, load(rows))  # noqa: E731
            yield canonical, tuple(shape), load
        missing = sorted(set(expected) - seen)
        if missing:
            raise FlashLLMError(f"{self.path}: {len(missing)} tensors missing, e.g. {missing[0]}")

    def identity(self, with_hash: bool = False) -> dict:
        """Name, size and (optionally) a content hash of the source, for a bundle's manifest."""
        ident = {"name": self.path.name, "kind": self.kind, "size": self.size_bytes}
        if with_hash:
            ident["sha256"] = hash_files(self.files())
        return ident

    def files(self) -> list[Path]:
        return [self.path] if self.path.is_file() else sorted(p for p in self.path.iterdir() if p.is_file())


class NameTable:
    """Source names -> canonical names by a table whose keys may hold {} for the layer number."""

    def __init__(self, table: dict[str, str | None]):
        self.exact = {k: v for k, v in table.items() if "{}" not in k}
        self.patterns = [(re.compile("^" + re.escape(k).replace(r"\{\}", r"(\d+)") + "$"), v)
                         for k, v in table.items() if "{}" in k]

    def map(self, name: str) -> str | None:
        if name in self.exact:
            return self.exact[name]
        for pattern, target in self.patterns:
            m = pattern.match(name)
            if m:
                return None if target is None else target.replace("{}", m.group(1))
        raise FlashLLMError(f"unexpected tensor {name!r} in checkpoint")


def hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()
