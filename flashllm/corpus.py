"""Text for predictor training and perplexity: a built-in corpus from Python's own documentation, or
the user's text files, each split into documents with a deterministic held-out split.

The built-in corpus needs no download: the language reference in `pydoc_data/topics.py` and the
docstrings of the standard library's modules (read with `ast`, never imported). A document is held out
when the CRC-32 of its name says so, so the split is stable when documents are added or removed
(another Python version ships slightly different text: the corpus description names the version).
"""

from __future__ import annotations

import ast
import functools
import os
import platform
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from flashllm.errors import FlashLLMError

HELDOUT_EVERY = 10  # one document in ten is held out
MAX_DOCUMENT_CHARS = 16_000  # long documents are cut into pieces so that none dominates
MIN_DOCUMENT_CHARS = 200
BUILTIN = "builtin"
SPLITS = ("train", "heldout")
# the built-in corpus's domains: "docs" (the language reference and docstrings: English technical prose,
# the default), "code" (the standard library's Python source), "chat" (one question and its answer per
# documented function, rendered through the model's own chat template)
DOMAINS = ("docs", "code", "chat")


@dataclass(frozen=True)
class Document:
    name: str
    load: Callable[[], str]
    chat: bool = False  # load() returns a conversation: user and assistant turns separated by CHAT_TURN

    @property
    def split(self) -> str:
        return "heldout" if zlib.crc32(b"split:" + self.name.encode()) % HELDOUT_EVERY == 0 else "train"


class Corpus:
    """Documents in a fixed order; text is read only when a document is reached."""

    def __init__(self, description: str, documents: list[Document]):
        self.description = description
        self.documents = documents

    def texts(self, split: str, render: Callable[[list[dict]], str] | None = None) -> Iterator[str]:
        """The split's texts; conversations through `render` (a chat template), else as plain turns."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        for doc in self.documents:
            if doc.split != split:
                continue
            if doc.chat:
                text = doc.load()
                if CHAT_TURN not in text:  # the file has fewer documented names
                    continue
                question, answer = text.split(CHAT_TURN, 1)
                messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                yield render(messages) if render else f"User: {question}\nAssistant: {answer}"
                continue
            yield from _pieces(doc.load())

    def tokens(self, split: str, encode: Callable[[str], list[int]], max_tokens: int,
               render: Callable[[list[dict]], str] | None = None) -> list[int]:
        """Token ids of the split's documents back to back (blank line between), up to max_tokens."""
        ids: list[int] = []
        for text in self.texts(split, render):
            ids += encode(text.strip() + "\n\n")
            if len(ids) >= max_tokens:
                break
        return ids[:max_tokens]


def load_corpus(path: str | Path | None = None) -> Corpus:
    """The built-in corpus (None or "builtin": its docs domain; "builtin:DOMAIN" one domain, "builtin:all" every
    domain interleaved), a text file, or a folder of text files."""
    if path is None or str(path) == BUILTIN:
        return builtin_corpus()
    if str(path).startswith(BUILTIN + ":"):
        domain = str(path)[len(BUILTIN) + 1:]
        if domain == "all":
            return mixed_corpus()
        return builtin_corpus(domain)
    path = Path(path).expanduser()
    if not path.exists():
        raise FlashLLMError(f"{path}: no such file or folder")
    if path.is_file():
        text = read_text(path)
        pieces = list(_pieces(text))
        docs = [Document(f"{path.name}#{i}", lambda p=p: p) for i, p in enumerate(pieces)]
        return Corpus(f"{path} ({len(text):,} characters)", _ensure_heldout(docs))
    files = sorted(p for p in _walk(path) if p.is_file())
    docs, chars = [], 0
    for file in files:
        try:
            text = read_text(file)
        except FlashLLMError:
            continue  # binary or empty files in a folder are skipped, not fatal
        chars += len(text)
        for i, piece in enumerate(_pieces(text)):
            docs.append(Document(f"{file.relative_to(path)}#{i}", lambda p=piece: p))
    if not docs:
        raise FlashLLMError(f"{path}: no text files in this folder")
    return Corpus(f"{path} ({len(files)} files, {chars:,} characters)", _ensure_heldout(docs))


def read_text(path: Path) -> str:
    """A UTF-8 text file, or a one-line error for a missing, empty or binary file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FlashLLMError(f"{path}: no such file")
    if path.is_dir():
        raise FlashLLMError(f"{path}: is a folder, expected a text file")
    data = path.read_bytes()
    if not data.strip():
        raise FlashLLMError(f"{path}: the file is empty")
    if b"\0" in data[:65536]:
        raise FlashLLMError(f"{path}: not a text file (binary content)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FlashLLMError(f"{path}: not a text file (not UTF-8)") from None


CHAT_TURN = "\x1e"  # separates a chat document's question from its answer


def builtin_corpus(domain: str = "docs") -> Corpus:
    """One domain of the built-in corpus (DOMAINS), its documents interleaved by hash."""
    if domain not in DOMAINS:
        raise FlashLLMError(f"unknown built-in domain {domain!r} (choose from {', '.join(DOMAINS)})")
    if domain == "code":
        docs = [Document(f"code/{name}", lambda f=file: _source(f)) for name, file in _library()]
        docs.sort(key=lambda d: zlib.crc32(d.name.encode()))
        return Corpus(f"built-in code: Python {platform.python_version()} standard library source", docs)
    if domain == "chat":
        docs = [Document(f"chat/{name}#{i}", lambda f=file, i=i: _qa(f, i), chat=True)
                for name, file in _library() for i in range(_QA_PER_FILE)]
        docs.sort(key=lambda d: zlib.crc32(d.name.encode()))
        return Corpus(f"built-in chat: questions on the Python {platform.python_version()} standard library "
                      "answered by its docstrings, through the model's chat template", docs)
    import pydoc_data.topics as topics

    docs = [Document(f"topics/{key}", lambda key=key: topics.topics[key]) for key in sorted(topics.topics)]
    lib = Path(sysconfig.get_paths()["stdlib"])
    for file in sorted(_walk(lib, skip={"site-packages", "dist-packages", "test", "tests", "idle_test",
                                        "__pycache__", "lib2to3", "turtledemo", "encodings"})):
        if file.suffix == ".py":
            docs.append(Document(f"lib/{file.relative_to(lib).as_posix()}", lambda f=file: _docstrings(f)))
    docs.sort(key=lambda d: zlib.crc32(d.name.encode()))
    return Corpus(f"built-in: Python {platform.python_version()} pydoc topics and standard library docstrings",
                  docs)


def mixed_corpus() -> Corpus:
    """Every domain of the built-in corpus, their documents interleaved by hash (each keeps its split)."""
    parts = [builtin_corpus(domain) for domain in DOMAINS]
    docs = sorted((d for part in parts for d in part.documents), key=lambda d: zlib.crc32(b"mix:" + d.name.encode()))
    return Corpus("built-in, every domain: " + "; ".join(part.description for part in parts), docs)


_QA_PER_FILE = 4  # questions drawn from each source file (its first documented functions and classes)


def _library() -> list[tuple[str, Path]]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "turtledemo",
            "encodings"}
    return [(file.relative_to(lib).as_posix(), file) for file in sorted(_walk(lib, skip)) if file.suffix == ".py"]


def _source(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


def _qa(file: Path, index: int) -> str:
    """The index-th documented function or class of a source file as a question and its answer (the
    docstring's first paragraph), or "" when the file has fewer."""
    questions = _questions(file)
    return questions[index] if index < len(questions) else ""


@functools.lru_cache(maxsize=None)
def _questions(file: Path) -> tuple[str, ...]:
    """A source file's first _QA_PER_FILE questions, parsed once for all of its chat documents (a few
    hundred bytes each)."""
    try:
        tree = ast.parse(file.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return ()
    module = file.stem if file.name != "__init__.py" else file.parent.name
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 80:
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                found.append(f"What does the {kind} `{node.name}` in Python's `{module}` module do?"
                             f"{CHAT_TURN}{doc.split(chr(10) * 2)[0].strip()}")
                if len(found) == _QA_PER_FILE:
                    break
    return tuple(found)


def _walk(root: Path, skip: set[str] = frozenset()) -> Iterator[Path]:
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(s for s in subfolders if s not in skip and not s.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


def _docstrings(file: Path) -> str:
    """Module, class and function docstrings of one source file, in source order."""
    try:
        tree = ast.parse(file.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                parts.append(doc)
    return "\n\n".join(parts)


def _pieces(text: str) -> Iterator[str]:
    """Cut a long text at blank lines into pieces of at most MAX_DOCUMENT_CHARS."""
    text = text.strip()
    if len(text) < MIN_DOCUMENT_CHARS:
        if text:
            yield text
        return
    start = 0
    while start < len(text):
        end = min(len(text), start + MAX_DOCUMENT_CHARS)
        if end < len(text):
            cut = text.rfind("\n\n", start + MAX_DOCUMENT_CHARS // 2, end)
            end = cut if cut > 0 else end
        yield text[start:end]
        start = end


def _ensure_heldout(docs: list[Document]) -> list[Document]:
    """A small user corpus may hash no document into the held-out split: then hold out the last one."""
    if len(docs) > 1 and not any(d.split == "heldout" for d in docs):
        last = docs[-1]
        docs[-1] = _HeldOut(last.name, last.load)
    return docs


@dataclass(frozen=True)
class _HeldOut(Document):
    @property
    def split(self) -> str:
        return "heldout"
