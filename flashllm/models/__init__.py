"""Model families, chosen by the checkpoint's own model_type or GGUF architecture. Knows no files."""

from __future__ import annotations

from flashllm.errors import FlashLLMError
from flashllm.models import gemma3, llama, opt
from flashllm.models.base import DTYPES, Family, Transformer, parse_dtype

FAMILIES = {"llama": llama.FAMILY, "opt": opt.FAMILY, "gemma3": gemma3.FAMILY}
# model_type / general.architecture -> family
ALIASES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "opt": "opt", "gemma3": "gemma3",
           "gemma3_text": "gemma3"}


def get_family(model_type: str) -> Family:
    """The family for a model type, or a FlashLLMError naming the supported ones."""
    name = ALIASES.get(str(model_type).lower())
    if name is None:
        raise FlashLLMError(f"model type {model_type!r} is not supported (supported: {', '.join(sorted(ALIASES))})")
    return FAMILIES[name]


def build_config(family: Family, hf_config: dict):
    try:
        return family.config.from_hf(hf_config)
    except (TypeError, ValueError, KeyError) as e:
        raise FlashLLMError(f"config.json does not describe a usable {family.name} model: {e}") from None


__all__ = ["ALIASES", "DTYPES", "FAMILIES", "Family", "Transformer", "build_config", "get_family", "parse_dtype"]
