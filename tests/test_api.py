"""The Python API on a tiny bundle: streaming and whole text agree with the CLI's engine, the stats of
the last call are filled, bad requests are one-line FlashLLMErrors."""

import pytest

from flashllm.api import Model
from flashllm.engine.flash_model import FlashModel
from flashllm.engine.generate import SamplingSettings
from flashllm.errors import FlashLLMError
from flashllm.tokenizer import StreamDecoder


@pytest.fixture
def bundle(tiny_float_bundle):
    return tiny_float_bundle


def test_stream_generate_and_stats(bundle):
    with Model.open(bundle, dram_budget="1GB", context=128) as model:
        pieces = list(model.stream("the cat sat", max_tokens=12))
        assert model.stats.tokens > 0 and model.stats.peak_rss_bytes > 0
        assert model.stats.budget_bytes == model.budget_bytes == 10**9
        whole = model.generate("the cat sat", max_tokens=12)
        assert "".join(pieces) == whole  # greedy: the same text, streamed or whole
        # the same tokens as the engine driven directly
        ids = model.tokenizer.encode("the cat sat")
        direct = FlashModel.open(bundle, "1GB", max_tokens=128, prefill_tokens=len(ids))
        tokens = list(direct.generate(ids, SamplingSettings(max_tokens=12), model.tokenizer.eos_token_ids))
        decoder = StreamDecoder(model.tokenizer)  # as the CLI prints them: whole characters only
        assert "".join(decoder.push(t) for t in tokens) == whole and len(tokens) == model.stats.tokens + 1
        sampled = [model.generate("the cat sat", max_tokens=8, temperature=1.0, seed=s) for s in (1, 1)]
        assert sampled[0] == sampled[1]  # a seed makes sampling repeatable


def test_bad_requests_are_one_line_errors(bundle, tmp_path):
    with pytest.raises(FlashLLMError, match="not a bundle"):
        Model.open(tmp_path / "nothing")
    with Model.open(bundle, dram_budget="1GB", context=32) as model:
        with pytest.raises(FlashLLMError, match="exceed the context"):
            model.generate("the cat sat", max_tokens=40)
        with pytest.raises(FlashLLMError, match="max_tokens"):
            model.generate("the cat sat", max_tokens=0)
