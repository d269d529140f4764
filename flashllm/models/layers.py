"""Pieces of attention every family shares: the preallocated KV cache, causal attention over it, and
rotary position embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class KVCache:
    """Preallocated keys and values for every layer; written in place, never concatenated."""

    def __init__(self, n_layers: int, max_tokens: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32):
        self.max_tokens = max_tokens
        self.k = torch.zeros(n_layers, n_kv_heads, max_tokens, head_dim, dtype=dtype)
        self.v = torch.zeros(n_layers, n_kv_heads, max_tokens, head_dim, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_for(n_layers: int, max_tokens: int, n_kv_heads: int, head_dim: int, itemsize: int) -> int:
        return 2 * n_layers * n_kv_heads * max_tokens * head_dim * itemsize


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int,
           start: int, scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """Store k, v at positions start.. and attend q causally to everything cached so far (with a
    `window`, only to the last `window` positions up to each query's own, as sliding-window layers do).

    q: [H, T, hd], k/v: [kvH, T, hd] -> [T, H*hd]
    """
    n_q_heads, T, head_dim = q.shape
    end = start + T
    if end > cache.max_tokens:
        raise ValueError(f"context of {end} tokens exceeds the cache of {cache.max_tokens}")
    cache.k[layer, :, start:end] = k
    cache.v[layer, :, start:end] = v
    first = max(0, start - window + 1) if window else 0  # the earliest position any query here sees
    keys = cache.k[layer, :, first:end]  # [kvH, S, hd]
    values = cache.v[layer, :, first:end]
    groups = n_q_heads // keys.shape[0]
    if groups > 1:
        keys = keys.repeat_interleave(groups, dim=0)  # [H, S, hd]
        values = values.repeat_interleave(groups, dim=0)
    mask = None
    if T > 1:
        rows, cols = torch.arange(start, end).unsqueeze(1), torch.arange(first, end).unsqueeze(0)
        mask = cols <= rows  # [T, S]
        if window:
            mask &= cols > rows - window
    out = F.scaled_dot_product_attention(q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                                         attn_mask=mask, scale=scale)  # [1, H, T, hd]
    return out[0].transpose(0, 1).reshape(T, n_q_heads * head_dim)


class Rotary:
    """Rotary position embedding in the rotate-half form of Hugging Face Llama."""

    def __init__(self, head_dim: int, theta: float, max_tokens: int, scaling: dict | None = None):
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
            inv_freq = _llama3_scaled(inv_freq, scaling)
        elif scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
            inv_freq = inv_freq / float(scaling["factor"])
        freqs = torch.outer(torch.arange(max_tokens, dtype=torch.float32), inv_freq)  # [S, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [S, hd]
        self.cos, self.sin = emb.cos(), emb.sin()

    @staticmethod
    def bytes_for(head_dim: int, max_tokens: int) -> int:
        """The cos and sin tables, float32 [max_tokens, head_dim] each."""
        return 2 * max_tokens * head_dim * 4

    @property
    def nbytes(self) -> int:
        return self.cos.nbytes + self.sin.nbytes

    def __call__(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x: [heads, T, hd] at positions start..start+T."""
        T = x.shape[1]
        cos = self.cos[start:start + T].to(x.dtype)
        sin = self.sin[start:start + T].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


def _llama3_scaled(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    middle = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(middle, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


