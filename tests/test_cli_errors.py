"""Bad input through the CLI: one line on stderr, non-zero exit, no traceback."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from flashllm.cli import app
from tests.tiny import tiny_llama

runner = CliRunner()


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def write_gguf(path, arch="llama", truncate_to=None):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((8, 4), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate_to is not None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * truncate_to)])
    return path


def test_missing_path(tmp_path):
    assert_one_line_error(runner.invoke(app, ["generate", str(tmp_path / "nope"), "hi"]), "no such file")


def test_folder_without_config(tmp_path):
    assert_one_line_error(runner.invoke(app, ["generate", str(tmp_path), "hi"]), "config.json")


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert_one_line_error(runner.invoke(app, ["generate", str(tmp_path), "hi"]), "mamba", "not supported")


def test_unsupported_gguf_architecture(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", arch="rwkv6")
    assert_one_line_error(runner.invoke(app, ["generate", str(path), "hi"]), "rwkv6", "not supported")


def test_truncated_gguf(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", truncate_to=0.7)
    assert_one_line_error(runner.invoke(app, ["generate", str(path), "hi"]), "GGUF")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "m.bin"
    path.write_bytes(b"hello world")
    assert_one_line_error(runner.invoke(app, ["generate", str(path), "hi"]), "not a GGUF")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors(tmp_path, keep):
    folder = tiny_llama(tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    assert_one_line_error(runner.invoke(app, ["generate", str(folder), "hi"]), "model.safetensors")


def test_missing_tokenizer(tmp_path):
    folder = tiny_llama(tmp_path / "m")
    assert_one_line_error(runner.invoke(app, ["generate", str(folder), "hi"]), "tokenizer")


def test_unknown_pull_name():
    assert_one_line_error(runner.invoke(app, ["pull", "gpt-5"]), "unknown model", "smollm2-135m")


def test_unknown_model_name_in_generate():
    assert_one_line_error(runner.invoke(app, ["generate", "gpt-5", "hi"]), "not a known model")


def test_help_lists_commands_without_importing_torch():
    """`flashllm --help` answers at once: the CLI imports torch inside command bodies, never at the top."""
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from flashllm.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); print(r.exit_code, 'torch' in sys.modules); print(r.output)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("0 False"), out[:200]
    for verb in ("generate", "pull", "convert", "train-predictor", "bench", "perplexity"):
        assert verb in out


def test_policy_help_names_every_policy():
    from flashllm.engine.cache import POLICIES

    for verb in ("generate", "bench"):
        text = " ".join(runner.invoke(app, [verb, "--help"], terminal_width=400).output.split())
        line = text[text.index("--policy"):][:300]
        assert all(policy in line for policy in POLICIES), (verb, line)
