"""The built-in corpus's domains: each has held-out documents, the same split every time, and the chat
domain goes through the model's own chat template."""

import zlib

import pytest

from flashllm.corpus import DOMAINS, builtin_corpus
from flashllm.errors import FlashLLMError
from flashllm.measure.perplexity import load_text_ids


class Template:
    """A tokenizer stand-in: characters as ids, and a chat template that marks each turn."""

    chat_template = "marks"

    def encode(self, text, add_bos=False):
        return [ord(c) for c in text]

    def render_chat(self, messages, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_domain_has_a_stable_heldout_split(domain):
    corpus = builtin_corpus(domain)
    held = [d.name for d in corpus.documents if d.split == "heldout"]
    train = [d.name for d in corpus.documents if d.split == "train"]
    assert held and len(train) > len(held)
    assert all(zlib.crc32(b"split:" + n.encode()) % 10 == 0 for n in held)
    assert [d.name for d in builtin_corpus(domain).documents] == [d.name for d in corpus.documents]
    text = next(corpus.texts("heldout", Template().render_chat))
    assert len(text) > 40


def test_code_is_source_and_chat_is_rendered_turns():
    code = next(builtin_corpus("code").texts("heldout"))
    assert any(word in code for word in ("def ", "import ", "class "))
    chat = next(builtin_corpus("chat").texts("heldout", Template().render_chat))
    assert chat.startswith("<user>What does the ") and "</user><assistant>" in chat and chat.endswith("</assistant>")
    plain = next(builtin_corpus("chat").texts("heldout"))  # without a template: plain turns
    assert plain.startswith("User: What does the ") and "\nAssistant: " in plain


def test_perplexity_reads_a_domain_split():
    ids, description = load_text_ids("builtin:chat:heldout", Template(), max_tokens=500)
    assert len(ids) == 500 and "chat" in description and "heldout" in description
    assert "".join(map(chr, ids)).startswith("<user>")
    docs, _ = load_text_ids("builtin:heldout", Template(), max_tokens=300)
    assert docs == load_text_ids("builtin:docs:heldout", Template(), max_tokens=300)[0]
    for bad in ("builtin:poetry:heldout", "builtin:code:test", "builtin:code:heldout:x"):
        with pytest.raises(FlashLLMError, match="unknown built-in split"):
            load_text_ids(bad, Template())


def test_the_mixed_corpus_holds_every_domain_with_its_own_split():
    from flashllm.corpus import load_corpus

    mixed = load_corpus("builtin:all")
    names = [d.name for d in mixed.documents]
    assert {n.split("/")[0] for n in names} >= {"code", "chat", "topics", "lib"}
    assert len(names) == sum(len(builtin_corpus(d).documents) for d in DOMAINS)
    held = {d.name for d in mixed.documents if d.split == "heldout"}
    for domain in DOMAINS:  # a document is held out in the mix exactly when it is in its own domain
        assert {d.name for d in builtin_corpus(domain).documents if d.split == "heldout"} <= held
    assert [d.name for d in load_corpus("builtin:code").documents] == [d.name for d in builtin_corpus("code").documents]
    with pytest.raises(FlashLLMError, match="unknown built-in domain"):
        load_corpus("builtin:poetry")
    texts = mixed.texts("train", Template().render_chat)
    assert any(t.startswith("<user>") for t, _ in zip(texts, range(200)))  # chat turns rendered in the mix
