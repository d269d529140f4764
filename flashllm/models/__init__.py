"""Model families, chosen by the checkpoint's own model_type or GGUF architecture."""

from __future__ import annotations

from flashllm.errors import FlashLLMError
from flashllm.models.base import Family, Transformer

# model_type / general.architecture -> family module
ALIASES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "opt": "opt"}


def get_family(model_type: str) -> Family:
    """The family for a model type, or a FlashLLMError naming the supported ones."""
    name = ALIASES.get(str(model_type).lower())
    if name is None:
        raise FlashLLMError(f"model type {model_type!r} is not supported (supported: {', '.join(sorted(ALIASES))})")
    if name == "llama":
        from flashllm.models.llama import FAMILY
    else:
        from flashllm.models.opt import FAMILY
    return FAMILY


def build_config(family: Family, hf_config: dict):
    try:
        return family.config.from_hf(hf_config)
    except (TypeError, ValueError, KeyError) as e:
        raise FlashLLMError(f"config.json does not describe a usable {family.name} model: {e}") from None


__all__ = ["ALIASES", "Family", "Transformer", "get_family", "build_config"]
