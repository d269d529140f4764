"""The Llama family: Llama, SmolLM2, Mistral and Qwen2 (q/k/v biases, tied or untied embeddings)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from flashllm.models.base import Family, Transformer
from flashllm.models.ffn import FFNSpec
from flashllm.models.qrows import linear
from flashllm.models.layers import KVCache, Rotary, attend

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}

# Hugging Face tensor name -> canonical name ({} is the layer number); None drops the tensor.
HF_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.o.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attn.q.bias",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attn.k.bias",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attn.v.bias",
    "model.layers.{}.self_attn.o_proj.bias": "layers.{}.attn.o.bias",
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.ffn.gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.ffn.up.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.ffn.down.weight",
}

GGUF_NAMES = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": None,
    "blk.{}.attn_norm.weight": "layers.{}.attn_norm.weight",
    "blk.{}.attn_q.weight": "layers.{}.attn.q.weight",
    "blk.{}.attn_k.weight": "layers.{}.attn.k.weight",
    "blk.{}.attn_v.weight": "layers.{}.attn.v.weight",
    "blk.{}.attn_output.weight": "layers.{}.attn.o.weight",
    "blk.{}.attn_q.bias": "layers.{}.attn.q.bias",
    "blk.{}.attn_k.bias": "layers.{}.attn.k.bias",
    "blk.{}.attn_v.bias": "layers.{}.attn.v.bias",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.ffn.gate.weight",
    "blk.{}.ffn_up.weight": "layers.{}.ffn.up.weight",
    "blk.{}.ffn_down.weight": "layers.{}.ffn.down.weight",
}


@dataclass
class LlamaConfig:
    """Hugging Face field names; qwen2 implies q/k/v biases."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"activation {self.hidden_act} is not supported")

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        known = {k: v for k, v in cfg.items() if k in cls.__dataclass_fields__ and k != "extra"}
        rope = cfg.get("rope_parameters") or {}
        if "rope_theta" not in known and "rope_theta" in rope:
            known["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and not known.get("rope_scaling"):
            known["rope_scaling"] = rope
        if known.get("head_dim") is None:
            known.pop("head_dim", None)
        return cls(**known)

    @classmethod
    def from_gguf(cls, meta: dict, arch: str, tensor_names: set[str]) -> "LlamaConfig":
        def get(key, default=None):
            return meta.get(f"{arch}.{key}", default)

        n_heads = int(get("attention.head_count"))
        d = int(get("embedding_length"))
        vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
        return cls(
            model_type=arch,
            vocab_size=int(vocab),
            hidden_size=d,
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=int(get("block_count")),
            num_attention_heads=n_heads,
            num_key_value_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=int(get("attention.key_length", d // n_heads)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names and arch != "qwen2",
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        )

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "extra"}

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        d, n_ff, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        shapes = {"embed.weight": (self.vocab_size, d), "norm.weight": (d,)}
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        for i in range(self.num_hidden_layers):
            p = f"layers.{i}."
            shapes |= {p + "attn_norm.weight": (d,), p + "ffn_norm.weight": (d,),
                       p + "attn.q.weight": (q, d), p + "attn.k.weight": (kv, d), p + "attn.v.weight": (kv, d),
                       p + "attn.o.weight": (d, q), p + "ffn.gate.weight": (n_ff, d),
                       p + "ffn.up.weight": (n_ff, d), p + "ffn.down.weight": (d, n_ff)}
            if self.qkv_bias:
                shapes |= {p + "attn.q.bias": (q,), p + "attn.k.bias": (kv,), p + "attn.v.bias": (kv,)}
            if self.attention_bias:
                shapes[p + "attn.o.bias"] = (d,)
        return shapes


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of q/k rows (it writes rotary pairs adjacent, HF writes halves)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


class LlamaModel(Transformer):
    def __init__(self, config: LlamaConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 compute_form: bool = True):
        super().__init__(config, weights, dtype, compute_form)
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.max_position_embeddings, config.rope_scaling)
        self.lm_head = weights["embed.weight"] if config.tie_word_embeddings else weights["lm_head.weight"]

    @classmethod
    def work_bytes_for(cls, config: LlamaConfig, tokens: int, max_tokens: int) -> int:
        return super().work_bytes_for(config, tokens, max_tokens) + Rotary.bytes_for(config.head_dim, max_tokens)

    def limit_context(self, max_tokens: int) -> None:
        c = self.config
        self.rotary = Rotary(c.head_dim, c.rope_theta, min(max_tokens, c.max_position_embeddings), c.rope_scaling)

    @staticmethod
    def ffn_spec(config: LlamaConfig) -> FFNSpec:
        return FFNSpec(gated=True, activation=ACTIVATIONS[config.hidden_act], d=config.hidden_size,
                       n_ff=config.intermediate_size, has_up_bias=False)

    def _norm(self, h: torch.Tensor, name: str) -> torch.Tensor:
        return F.rms_norm(h, (h.shape[-1],), self.weights[name], self.config.rms_norm_eps)

    def _proj(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return linear(x, self.weights[name + ".weight"], self.weights.get(name + ".bias"), self.workspace, self.int8_x)

    def attention(self, layer: int, h: torch.Tensor, start: int, cache: KVCache) -> torch.Tensor:
        c, p = self.config, f"layers.{layer}."
        T = h.shape[0]
        x = self._norm(h, p + "attn_norm.weight")
        q = self._proj(x, p + "attn.q").view(T, c.num_attention_heads, c.head_dim).transpose(0, 1)  # [H, T, hd]
        k = self._proj(x, p + "attn.k").view(T, c.num_key_value_heads, c.head_dim).transpose(0, 1)  # [kvH, T, hd]
        v = self._proj(x, p + "attn.v").view(T, c.num_key_value_heads, c.head_dim).transpose(0, 1)
        q, k = self.rotary(q, start), self.rotary(k, start)
        out = attend(q, k, v, cache, layer, start)  # [T, H*hd]
        return h + self._proj(out, p + "attn.o")

    def ffn_input(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return self._norm(h, f"layers.{layer}.ffn_norm.weight")

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return linear(self._norm(h, "norm.weight"), self.lm_head, work=self.workspace, int8_x=self.int8_x)  # [T, vocab]


def gguf_tensor_fixup(config: LlamaConfig, arch: str, canonical: str, tensor: torch.Tensor) -> torch.Tensor:
    """llama.cpp permutes q/k rows for the `llama` architecture only (qwen2 uses NeoX rope as is)."""
    if arch == "llama" and canonical.endswith(("attn.q.weight", "attn.q.bias")):
        return unpermute_qk(tensor, config.num_attention_heads)
    if arch == "llama" and canonical.endswith(("attn.k.weight", "attn.k.bias")):
        return unpermute_qk(tensor, config.num_key_value_heads)
    return tensor


FAMILY = Family(name="llama", config=LlamaConfig, model=LlamaModel, hf_names=HF_NAMES, gguf_names=GGUF_NAMES,
                gguf_fixup=gguf_tensor_fixup)
