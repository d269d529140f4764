"""The forward pass shared by the families: embed, then per layer attention and FFN, then the head.

A family supplies the blocks. Two parts are providers set once on a model: the FFN (any callable
(layer, x) -> y; the flash engine's streams neurons from flash while attention stays resident) and the
token embedding lookup (tokens -> rows; the flash engine reads an untied table's rows from flash).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from flashllm.errors import FlashLLMError
from flashllm.models.ffn import FFNSpec, neuron_coefficients
from flashllm.models.layers import KVCache
from flashllm.models.qrows import (
    QRows,
    Workspace,
    for_compute,
    take_rows,
    weight_nbytes,
)

FFNFunction = Callable[[int, torch.Tensor], torch.Tensor]  # (layer, x [T, d]) -> y [T, d]
EmbeddingFunction = Callable[[torch.Tensor], torch.Tensor]  # token ids [T] -> rows [T, d]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise FlashLLMError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


@dataclass(frozen=True)
class Family:
    """One model family: its config class, its blocks, and how checkpoint tensor names map to ours."""

    name: str
    config: Any
    model: Any
    hf_names: dict[str, str | None]
    gguf_names: dict[str, str | None]
    gguf_fixup: Callable | None = None


class FamilyConfig(Protocol):
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int

    def to_dict(self) -> dict: ...


class Transformer:
    """Weights by canonical name, and the forward pass over a preallocated KV cache."""

    ffn_parts = ("ffn.gate.weight", "ffn.up.weight", "ffn.down.weight", "ffn.up.bias")

    def __init__(self, config, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 compute_form: bool = True):
        self.config = config
        self.weights = weights
        self.dtype = dtype
        self.spec: FFNSpec = self.ffn_spec(config)
        for name, w in weights.items():  # quantized matrices in the form they compute fastest in (unless
            if name != "embed.weight" and compute_form:  # the caller keeps them as they are, e.g. mapped)
                weights[name] = for_compute(w)
        self.ffn: FFNFunction = self.ffn_dense
        self.embedding: EmbeddingFunction = self.embedding_lookup
        self.workspace: Workspace | None = None  # quantized matrices expand into it (None: a temporary per call)
        self.int8_x = False  # QRows matrices in C multiply x quantized to int8 groups (flashllm.native)
        self.max_pass: int | None = None  # a prompt's prefill runs in passes of at most this many tokens

    @property
    def nbytes(self) -> int:
        """DRAM the weights keep (quantized ones in their compute form)."""
        return sum(weight_nbytes(w) for w in self.weights.values())

    def use_ffn(self, provider: FFNFunction) -> None:
        """Compute every layer's FFN with `provider` from now on (the flash engine's, a recorder...)."""
        self.ffn = provider

    def with_ffn(self, provider: FFNFunction) -> Transformer:
        """A model sharing these weights (and cache layout) whose FFN is `provider`; this one is unchanged."""
        other = copy.copy(self)
        other.ffn = provider
        return other

    @property
    def quantized_width(self) -> int:
        """The widest row of the matrices kept as QRows (0: none), which a shared Workspace must hold."""
        return max((w.k for w in self.weights.values() if isinstance(w, QRows)), default=0)

    def use_workspace(self, work: Workspace) -> None:
        """Expand quantized matrices into `work` (made once and counted by the caller) from now on."""
        self.workspace = work

    def use_embedding(self, provider: EmbeddingFunction) -> None:
        """Look token rows up with `provider` (e.g. read from flash) instead of the resident table."""
        self.embedding = provider

    # -- supplied by a family -------------------------------------------------------------------
    @staticmethod
    def ffn_spec(config) -> FFNSpec:
        raise NotImplementedError

    def embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Token rows (from the embedding provider) plus whatever the family adds for positions."""
        return self.embedding(tokens)

    def attention(self, layer: int, h: torch.Tensor, start: int, cache: KVCache) -> torch.Tensor:
        """h -> h + attention(norm(h)): the whole resident half of a layer."""
        raise NotImplementedError

    def ffn_input(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def work_bytes_for(cls, config, tokens: int, max_tokens: int) -> int:
        """Temporaries of a forward pass over `tokens` tokens against a context of `max_tokens`: hidden
        states, attention and norm outputs (32 bytes per value of d, measured), attention's scores and
        weights (float32, per head and cached position) and the keys/values repeated for grouped heads,
        plus the float32 logits and their softmax; families add their position tables."""
        heads, head_dim = config.num_attention_heads, config.head_dim
        attention = tokens * heads * max_tokens * 8 + 2 * heads * max_tokens * head_dim * 4
        return tokens * config.hidden_size * 32 + attention + config.vocab_size * 8

    # -- shared ---------------------------------------------------------------------------------
    def w(self, name: str) -> torch.Tensor | None:
        return self.weights.get(name)

    def embedding_lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        return take_rows(self.weights["embed.weight"], tokens).to(self.dtype)  # [T, d]

    def limit_pass(self, tokens: int) -> None:
        """Prefill prompts (last_only forwards) in passes of at most `tokens` tokens: the temporaries of a
        pass grow with its tokens (attention scores with tokens x context), a long prompt's must not."""
        self.max_pass = max(1, tokens)

    def limit_context(self, max_tokens: int) -> None:
        """Size position tables for max_tokens instead of the model's whole context (saves DRAM)."""

    def new_cache(self, max_tokens: int) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, max_tokens, c.num_key_value_heads, c.head_dim, self.dtype)

    def ffn_dense(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The FFN over all neurons, from resident weights (down bias excluded: see ffn_output)."""
        p = f"layers.{layer}."
        a = neuron_coefficients(self.spec, x, self.w(p + "ffn.gate.weight"), self.w(p + "ffn.up.weight"),
                                self.w(p + "ffn.up.bias"))  # [T, n_ff]
        return F.linear(a, self.w(p + "ffn.down.weight"))  # [T, d]; the fast gemv path in fp16 too

    def ffn_output(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        bias = self.w(f"layers.{layer}.ffn.down.bias")
        return y if bias is None else y + bias

    def forward(self, tokens: torch.Tensor, start: int, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Logits for tokens at positions start.. ([T, vocab], or [1, vocab] with last_only)."""
        if last_only and self.max_pass is not None and len(tokens) > self.max_pass:
            step = self.max_pass
            for offset in range(0, len(tokens) - step, step):  # all passes but the last fill the cache
                self._layers(tokens[offset:offset + step], start + offset, cache, prompt=True)
            offset = (len(tokens) - 1) // step * step
            tokens, start = tokens[offset:], start + offset
        h = self._layers(tokens, start, cache, prompt=last_only)
        if last_only:
            h = h[-1:]
        return self.head(h).float()

    def _layers(self, tokens: torch.Tensor, start: int, cache: KVCache, prompt: bool = False) -> torch.Tensor:
        """The hidden states after the last layer, [T, d]. `prompt`: this pass is a prompt's prefill (a
        last_only forward), which a sparse FFN provider computes with every neuron (see begin_pass)."""
        ffn = self.ffn
        begin = getattr(ffn, "begin_pass", None)
        if begin is not None:
            begin(start, len(tokens), prompt)
        h = self.embed(tokens, start)  # [T, d]
        for layer in range(self.config.num_hidden_layers):
            h = self.attention(layer, h, start, cache)
            h = h + self.ffn_output(layer, ffn(layer, self.ffn_input(layer, h)))
        return h
