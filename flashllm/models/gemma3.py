"""Gemma 3 (text): GeGLU (gelu-tanh) FFN, (1 + w) RMSNorm before and after attention and the FFN, q/k
norms, local sliding-window layers with their own rope base between global ones, embeddings scaled by
sqrt(d), tied LM head."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from flashllm.models.base import Family, Transformer
from flashllm.models.ffn import FFNSpec
from flashllm.models.layers import KVCache, Rotary, attend
from flashllm.models.qrows import linear

SLIDING, FULL = "sliding_attention", "full_attention"
LLAMA_CPP_PATTERN = 6  # llama.cpp's gemma3: every 6th layer global, the local rope base 10000
LOCAL_ROPE_BASE = 10000.0

HF_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.o.weight",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.post_attn_norm.weight",
    "model.layers.{}.pre_feedforward_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "layers.{}.post_ffn_norm.weight",
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
    "blk.{}.attn_q_norm.weight": "layers.{}.attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "layers.{}.attn.k_norm.weight",
    "blk.{}.post_attention_norm.weight": "layers.{}.post_attn_norm.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
    "blk.{}.post_ffw_norm.weight": "layers.{}.post_ffn_norm.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.ffn.gate.weight",
    "blk.{}.ffn_up.weight": "layers.{}.ffn.up.weight",
    "blk.{}.ffn_down.weight": "layers.{}.ffn.down.weight",
}


@dataclass
class Gemma3Config:
    """Hugging Face Gemma3TextConfig field names (rope_theta: the global layers' base)."""

    model_type: str = "gemma3_text"
    vocab_size: int = 262208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = LOCAL_ROPE_BASE
    rope_scaling: dict | None = None  # the global layers' only
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    layer_types: list[str] | None = None
    sliding_window_pattern: int = LLAMA_CPP_PATTERN
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = [FULL if (i + 1) % self.sliding_window_pattern == 0 else SLIDING
                                for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {SLIDING, FULL}:
            raise ValueError(f"layer_types must name {SLIDING} or {FULL} for each of the {self.num_hidden_layers} layers")
        if self.hidden_activation != "gelu_pytorch_tanh":
            raise ValueError(f"activation {self.hidden_activation} is not supported (Gemma 3: gelu_pytorch_tanh)")
        if self.attn_logit_softcapping is not None or self.attention_bias:
            raise ValueError("attention logit softcapping and attention biases are not supported")
        if not self.sliding_window or self.sliding_window < 1:
            raise ValueError(f"sliding_window is {self.sliding_window}, must be a positive number of tokens")

    @classmethod
    def from_hf(cls, cfg: dict) -> Gemma3Config:
        if cfg.get("model_type") == "gemma3" and "text_config" in cfg:
            raise ValueError("the multimodal gemma3 checkpoint is not supported; use a text-only Gemma3ForCausalLM")
        known = {k: v for k, v in cfg.items() if k in cls.__dataclass_fields__ and k != "extra"}
        rope = cfg.get("rope_parameters") or {}
        full, local = rope.get(FULL) or {}, rope.get(SLIDING) or {}
        if "rope_theta" in full:
            known["rope_theta"] = full["rope_theta"]
        if "rope_theta" in local:
            known["rope_local_base_freq"] = local["rope_theta"]
        if full.get("rope_type", "default") != "default" and not known.get("rope_scaling"):
            known["rope_scaling"] = full
        return cls(**known)

    @classmethod
    def from_gguf(cls, meta: dict, arch: str, tensor_names: set[str]) -> Gemma3Config:
        def get(key, default=None):
            return meta.get(f"{arch}.{key}", default)

        n_heads, d = int(get("attention.head_count")), int(get("embedding_length"))
        head_dim, layers = int(get("attention.key_length", 256)), int(get("block_count"))
        scaling = None
        if get("rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        return cls(
            vocab_size=int(get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))),
            hidden_size=d, intermediate_size=int(get("feed_forward_length")), num_hidden_layers=layers,
            num_attention_heads=n_heads, num_key_value_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=head_dim, rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 1_000_000.0)), rope_scaling=scaling,
            max_position_embeddings=int(get("context_length", 131072)),
            # llama.cpp scales queries by d / heads for the 27B model (62 layers), by head_dim otherwise
            query_pre_attn_scalar=d // n_heads if layers == 62 else head_dim,
            sliding_window=int(get("attention.sliding_window", 4096)),
            layer_types=_gguf_layer_types(get("attention.sliding_window_pattern"), layers),
            final_logit_softcapping=get("final_logit_softcapping"),
            attn_logit_softcapping=get("attn_logit_softcapping"),
            tie_word_embeddings="output.weight" not in tensor_names,
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
            shapes |= {p + f"{norm}.weight": (d,) for norm in ("attn_norm", "post_attn_norm", "ffn_norm", "post_ffn_norm")}
            shapes |= {p + "attn.q_norm.weight": (hd,), p + "attn.k_norm.weight": (hd,),
                       p + "attn.q.weight": (q, d), p + "attn.k.weight": (kv, d), p + "attn.v.weight": (kv, d),
                       p + "attn.o.weight": (d, q), p + "ffn.gate.weight": (n_ff, d),
                       p + "ffn.up.weight": (n_ff, d), p + "ffn.down.weight": (d, n_ff)}
        return shapes


def _gguf_layer_types(pattern, layers: int) -> list[str]:
    """A per-layer list of booleans (true: sliding), a period, or llama.cpp's default period."""
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise ValueError(f"attention.sliding_window_pattern has {len(pattern)} entries for {layers} layers")
        return [SLIDING if bool(p) else FULL for p in pattern]
    period = int(pattern) if pattern else LLAMA_CPP_PATTERN
    return [FULL if (i + 1) % period == 0 else SLIDING for i in range(layers)]


class Gemma3Model(Transformer):
    def __init__(self, config: Gemma3Config, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 compute_form: bool = True):
        super().__init__(config, weights, dtype, compute_form)
        self.lm_head = weights["embed.weight"] if config.tie_word_embeddings else weights["lm_head.weight"]
        self.limit_context(config.max_position_embeddings)

    @classmethod
    def work_bytes_for(cls, config: Gemma3Config, tokens: int, max_tokens: int) -> int:
        rotary = 2 * Rotary.bytes_for(config.head_dim, min(max_tokens, config.max_position_embeddings))
        return super().work_bytes_for(config, tokens, max_tokens) + rotary  # a local and a global table

    def limit_context(self, max_tokens: int) -> None:
        c, n = self.config, min(max_tokens, self.config.max_position_embeddings)
        self.rotary = {SLIDING: Rotary(c.head_dim, c.rope_local_base_freq, n),
                       FULL: Rotary(c.head_dim, c.rope_theta, n, c.rope_scaling)}

    @staticmethod
    def ffn_spec(config: Gemma3Config) -> FFNSpec:
        return FFNSpec(gated=True, activation="gelu_tanh", d=config.hidden_size, n_ff=config.intermediate_size,
                       has_up_bias=False)

    def _norm(self, h: torch.Tensor, name: str) -> torch.Tensor:
        """Gemma's RMSNorm: scaled by (1 + w), computed in float32 as transformers does."""
        scale = 1.0 + self.weights[name].float()
        return F.rms_norm(h.float(), (h.shape[-1],), scale, self.config.rms_norm_eps).to(h.dtype)

    def _proj(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return linear(x, self.weights[name + ".weight"], None, self.workspace, self.int8_x)

    def embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        rows = self.embedding(tokens)  # [T, d]
        return rows * torch.tensor(self.config.hidden_size ** 0.5, dtype=rows.dtype)  # rounded as the table's dtype

    def attention(self, layer: int, h: torch.Tensor, start: int, cache: KVCache) -> torch.Tensor:
        c, p = self.config, f"layers.{layer}."
        T, kind = h.shape[0], c.layer_types[layer]
        x = self._norm(h, p + "attn_norm.weight")
        q = self._proj(x, p + "attn.q").view(T, c.num_attention_heads, c.head_dim).transpose(0, 1)  # [H, T, hd]
        k = self._proj(x, p + "attn.k").view(T, c.num_key_value_heads, c.head_dim).transpose(0, 1)  # [kvH, T, hd]
        v = self._proj(x, p + "attn.v").view(T, c.num_key_value_heads, c.head_dim).transpose(0, 1)
        q, k = self._norm(q, p + "attn.q_norm.weight"), self._norm(k, p + "attn.k_norm.weight")
        q, k = self.rotary[kind](q, start), self.rotary[kind](k, start)
        window = c.sliding_window if kind == SLIDING else None
        out = attend(q, k, v, cache, layer, start, scale=c.query_pre_attn_scalar ** -0.5, window=window)  # [T, H*hd]
        return h + self._norm(self._proj(out, p + "attn.o"), p + "post_attn_norm.weight")

    def ffn_input(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return self._norm(h, f"layers.{layer}.ffn_norm.weight")

    def ffn_output(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        return self._norm(y, f"layers.{layer}.post_ffn_norm.weight")

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = linear(self._norm(h, "norm.weight"), self.lm_head, work=self.workspace, int8_x=self.int8_x)  # [T, vocab]
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


def gguf_tensor_fixup(config: Gemma3Config, arch: str, canonical: str, tensor: torch.Tensor) -> torch.Tensor:
    """llama.cpp stores Gemma's norm weights as 1 + w; ours (and transformers') are w."""
    return tensor - 1 if canonical.endswith("norm.weight") else tensor


FAMILY = Family(name="gemma3", config=Gemma3Config, model=Gemma3Model, hf_names=HF_NAMES, gguf_names=GGUF_NAMES,
                gguf_fixup=gguf_tensor_fixup)
