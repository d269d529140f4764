"""The Python API: open a bundle under a DRAM budget, generate (a stream of text pieces, or the whole
text), read the statistics of the last call. The same engine as `flashllm generate --dram-budget`.

    from flashllm.api import Model

    with Model.open("~/.cache/flashllm/bundles/smollm2-135m", dram_budget="70%") as model:
        for piece in model.stream("The capital of France is", max_tokens=16):
            print(piece, end="", flush=True)
        print(model.generate("What is the capital of France?", chat=True, max_tokens=16))
        print(model.stats.tokens_per_s, model.stats.peak_rss_bytes, model.stats.budget_bytes)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from flashllm.engine.flash_model import PREFILL_PASS, FlashModel, FlashSettings
from flashllm.engine.generate import SamplingSettings
from flashllm.engine.stats import FlashStats
from flashllm.errors import FlashLLMError
from flashllm.tokenizer import StreamDecoder, Tokenizer

DEFAULT_CONTEXT = 512  # tokens of prompt + generation the KV cache is planned for (SmolLM2: 24 MB of KV)


class Model:
    """A bundle opened under a DRAM budget, with its tokenizer. Calls are served one at a time."""

    def __init__(self, flash: FlashModel, tokenizer: Tokenizer, context: int):
        self.flash, self.tokenizer, self.context = flash, tokenizer, context
        self.stats = FlashStats()  # of the last call, filled when its stream ends
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}  # of the last call, counted as it goes

    @classmethod
    def open(cls, bundle: str | Path, dram_budget: int | str = "50%", context: int = DEFAULT_CONTEXT,
             settings: FlashSettings | None = None) -> Model:
        """The bundle folder under `dram_budget` (bytes, "800MiB" or a share of the bundle such as "50%"),
        planned for `context` tokens of prompt plus generation (its KV cache is part of the budget)."""
        folder = Path(bundle).expanduser()
        tokenizer = Tokenizer.from_folder(folder) if folder.is_dir() else None
        if tokenizer is None:
            raise FlashLLMError(f"{folder}: not a bundle with a tokenizer (make one with `flashllm convert`)")
        flash = FlashModel.open(folder, dram_budget, settings, max_tokens=context,
                                prefill_tokens=min(PREFILL_PASS, context - 1))
        return cls(flash, tokenizer, min(context, flash.bundle.config.max_position_embeddings))

    def stream(self, prompt: str, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, chat: bool = False, system: str | None = None) -> Iterator[str]:
        """The generated text piece by piece (whole characters only), as an iterator; a bad request is
        refused here, before anything runs. `chat`: the prompt is a user message rendered with the
        checkpoint's chat template (and `system`, if given)."""
        if max_tokens < 1:
            raise FlashLLMError(f"max_tokens {max_tokens}: must be at least 1")
        text = prompt
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": prompt}]
            text = self.tokenizer.render_chat(messages)
        ids = self.tokenizer.encode(text)
        if len(ids) + max_tokens > self.context:
            raise FlashLLMError(f"{len(ids)} prompt tokens + {max_tokens} to generate exceed the context of "
                                f"{self.context} this model was opened for (Model.open(..., context=N))")
        settings = SamplingSettings(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        return self._pieces(ids, settings)

    def _pieces(self, ids: list[int], settings: SamplingSettings) -> Iterator[str]:
        decoder, self.stats = StreamDecoder(self.tokenizer), FlashStats()
        self.usage = {"prompt_tokens": len(ids), "completion_tokens": 0}
        for token in self.flash.generate(ids, settings, self.tokenizer.eos_token_ids, self.stats):
            self.usage["completion_tokens"] += 1
            piece = decoder.push(token)
            if piece:
                yield piece

    def generate(self, prompt: str, **options) -> str:
        """The whole generated text (options as for `stream`)."""
        return "".join(self.stream(prompt, **options))

    @property
    def budget_bytes(self) -> int:
        return self.flash.plan.budget_bytes

    def close(self) -> None:
        self.flash.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
