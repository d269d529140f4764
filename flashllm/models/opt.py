"""OPT: ReLU FFN with biases, LayerNorm, learned positions with OPT's offset of 2."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from flashllm.models.base import Family, Transformer
from flashllm.models.ffn import FFNSpec
from flashllm.models.qrows import linear
from flashllm.models.layers import KVCache, attend

POSITION_OFFSET = 2  # OPT's learned position table starts at index 2 (a fairseq heritage)

HF_NAMES = {
    "model.decoder.embed_tokens.weight": "embed.weight",
    "model.decoder.embed_positions.weight": "pos_embed.weight",
    "model.decoder.final_layer_norm.weight": "norm.weight",
    "model.decoder.final_layer_norm.bias": "norm.bias",
    "lm_head.weight": None,  # tied to the embeddings
    "model.decoder.layers.{}.self_attn_layer_norm.weight": "layers.{}.attn_norm.weight",
    "model.decoder.layers.{}.self_attn_layer_norm.bias": "layers.{}.attn_norm.bias",
    "model.decoder.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q.weight",
    "model.decoder.layers.{}.self_attn.q_proj.bias": "layers.{}.attn.q.bias",
    "model.decoder.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k.weight",
    "model.decoder.layers.{}.self_attn.k_proj.bias": "layers.{}.attn.k.bias",
    "model.decoder.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v.weight",
    "model.decoder.layers.{}.self_attn.v_proj.bias": "layers.{}.attn.v.bias",
    "model.decoder.layers.{}.self_attn.out_proj.weight": "layers.{}.attn.o.weight",
    "model.decoder.layers.{}.self_attn.out_proj.bias": "layers.{}.attn.o.bias",
    "model.decoder.layers.{}.final_layer_norm.weight": "layers.{}.ffn_norm.weight",
    "model.decoder.layers.{}.final_layer_norm.bias": "layers.{}.ffn_norm.bias",
    "model.decoder.layers.{}.fc1.weight": "layers.{}.ffn.up.weight",
    "model.decoder.layers.{}.fc1.bias": "layers.{}.ffn.up.bias",
    "model.decoder.layers.{}.fc2.weight": "layers.{}.ffn.down.weight",
    "model.decoder.layers.{}.fc2.bias": "layers.{}.ffn.down.bias",
}


@dataclass
class OPTConfig:
    """Hugging Face field names; the properties give the names the engine uses for every family."""

    model_type: str = "opt"
    vocab_size: int = 50272
    hidden_size: int = 768
    ffn_dim: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | None = 2

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        if not self.do_layer_norm_before or self.word_embed_proj_dim != self.hidden_size:
            raise ValueError("OPT variants with post-LayerNorm or projected embeddings (opt-350m) are not supported")
        if self.activation_function != "relu" or not self.enable_bias or not self.layer_norm_elementwise_affine:
            raise ValueError("only OPT with ReLU, biases and affine LayerNorm is supported")

    intermediate_size = property(lambda self: self.ffn_dim)
    num_key_value_heads = property(lambda self: self.num_attention_heads)
    head_dim = property(lambda self: self.hidden_size // self.num_attention_heads)
    tie_word_embeddings = property(lambda self: True)

    @classmethod
    def from_hf(cls, cfg: dict) -> "OPTConfig":
        return cls(**{k: v for k, v in cfg.items() if k in cls.__dataclass_fields__})

    @classmethod
    def from_gguf(cls, meta: dict, arch: str, tensor_names: set[str]) -> "OPTConfig":
        raise ValueError("OPT has no GGUF form")

    def to_dict(self) -> dict:
        return asdict(self)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        d, n_ff = self.hidden_size, self.ffn_dim
        shapes = {"embed.weight": (self.vocab_size, d), "pos_embed.weight": (self.max_position_embeddings + 2, d),
                  "norm.weight": (d,), "norm.bias": (d,)}
        for i in range(self.num_hidden_layers):
            p = f"layers.{i}."
            for norm in ("attn_norm", "ffn_norm"):
                shapes |= {p + norm + ".weight": (d,), p + norm + ".bias": (d,)}
            for proj in "qkvo":
                shapes |= {p + f"attn.{proj}.weight": (d, d), p + f"attn.{proj}.bias": (d,)}
            shapes |= {p + "ffn.up.weight": (n_ff, d), p + "ffn.up.bias": (n_ff,),
                       p + "ffn.down.weight": (d, n_ff), p + "ffn.down.bias": (d,)}
        return shapes


class OPTModel(Transformer):
    @staticmethod
    def ffn_spec(config: OPTConfig) -> FFNSpec:
        return FFNSpec(gated=False, activation="relu", d=config.hidden_size, n_ff=config.ffn_dim, has_up_bias=True)

    def _norm(self, h: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(h, (h.shape[-1],), self.weights[name + ".weight"], self.weights[name + ".bias"])

    def _proj(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return linear(x, self.weights[name + ".weight"], self.weights[name + ".bias"], self.workspace, self.int8_x)

    def embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        positions = torch.arange(start, start + tokens.shape[0]) + POSITION_OFFSET
        return self.embedding(tokens) + self.weights["pos_embed.weight"][positions]  # [T, d]

    def attention(self, layer: int, h: torch.Tensor, start: int, cache: KVCache) -> torch.Tensor:
        c, p = self.config, f"layers.{layer}."
        T = h.shape[0]
        x = self._norm(h, p + "attn_norm")
        heads = lambda t: t.view(T, c.num_attention_heads, c.head_dim).transpose(0, 1)  # noqa: E731  [H, T, hd]
        q, k, v = (heads(self._proj(x, p + f"attn.{n}")) for n in "qkv")
        out = attend(q, k, v, cache, layer, start)  # [T, d]
        return h + self._proj(out, p + "attn.o")

    def ffn_input(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return self._norm(h, f"layers.{layer}.ffn_norm")

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return linear(self._norm(h, "norm"), self.weights["embed.weight"], work=self.workspace, int8_x=self.int8_x)  # [T, vocab]


FAMILY = Family(name="opt", config=OPTConfig, model=OPTModel, hf_names=HF_NAMES, gguf_names={})
