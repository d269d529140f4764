"""Tiny random checkpoints built with transformers and saved as Hugging Face folders."""

from pathlib import Path

import torch


def tiny_llama(folder: Path, kind: str = "llama", seed: int = 0, **overrides) -> Path:
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, rope_theta=10000.0)
    common.update(overrides)
    if kind == "qwen2":
        config = transformers.Qwen2Config(tie_word_embeddings=False, **common)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(tie_word_embeddings=kind == "llama-tied", **common)
        model = transformers.LlamaForCausalLM(config)
    _randomize(model)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_opt(folder: Path, seed: int = 0, **overrides) -> Path:
    import transformers

    torch.manual_seed(seed)
    cfg = dict(vocab_size=96, hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128, word_embed_proj_dim=64, do_layer_norm_before=True)
    cfg.update(overrides)
    model = transformers.OPTForCausalLM(transformers.OPTConfig(**cfg))
    _randomize(model)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_gemma3(folder: Path, seed: int = 0, **overrides) -> Path:
    """Three layers, local-global-local, with a sliding window of 4 tokens (shorter than the test prompts)."""
    import transformers

    torch.manual_seed(seed)
    cfg = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 128,
           "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
           "query_pre_attn_scalar": 24, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
           "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    cfg.update(overrides)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**cfg))
    _randomize(model)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _randomize(model):
    """Random init leaves biases and norms at 0/1; perturb them so the test checks their use."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()


def hf_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def tiny_tokenizer(folder: Path, vocab_size: int = 96) -> None:
    """A byte-level BPE trained on a little stdlib text, saved beside a tiny checkpoint."""
    import json
    import pydoc_data.topics as topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([topics.topics["assignment"], topics.topics["if"]], trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
