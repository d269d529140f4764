"""convert: record layout, bit-identical dense logits from the bundle, atomicity, verify, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from flashllm.bundle.writer import convert
from flashllm.bundle.reader import Bundle
from flashllm.bundle.format import ALIGNMENT, FORMAT_VERSION
from flashllm.bundle.verify import verify
from flashllm.models import DTYPES
from flashllm.bundle import writer
from flashllm.cli import app
from flashllm.engine.generate import load_dense
from flashllm.errors import FlashLLMError
from tests.test_cli_errors import assert_one_line_error
from tests.tiny import tiny_llama, tiny_opt, tiny_tokenizer

runner = CliRunner()


def shutil_usage(free):
    import shutil

    return shutil._ntuple_diskusage(total=free, used=0, free=free)
IDS = [5, 17, 3, 88, 41, 2, 60, 60, 9, 33, 71, 12]


def make(tmp_path, kind):
    folder = tmp_path / kind
    return tiny_opt(folder) if kind == "opt" else tiny_llama(folder, kind=kind)


def logits(path, dtype):
    model = load_dense(path, dtype).model
    return model.forward(torch.tensor(IDS), 0, model.new_cache(len(IDS)))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "opt"])
@pytest.mark.parametrize("bundle_layout", ["bundled", "split"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_bundle_logits_bit_identical_to_source(tmp_path, kind, bundle_layout, dtype):
    source = make(tmp_path, kind)
    out = tmp_path / "bundle"
    convert(source, out, dtype=dtype, layout=bundle_layout)
    torch_dtype = DTYPES[dtype]
    assert torch.equal(logits(out, torch_dtype), logits(source, torch_dtype))


def test_bundled_records_hold_gate_up_down_contiguously(tmp_path):
    source = make(tmp_path, "llama")
    out = tmp_path / "bundle"
    convert(source, out, dtype="float32")
    weights = load_dense(source).model.weights
    bundle = Bundle(out)
    (region, parts), = bundle.regions(1)
    d = bundle.config.hidden_size
    assert region.offset % ALIGNMENT == 0 and region.stride == 3 * d * 4
    data = (out / bundle.layers[1]["file"]).read_bytes()
    for i in (0, 1, 77, bundle.config.intermediate_size - 1):
        record = torch.frombuffer(bytearray(data[region.offset + i * region.stride:][:region.stride]), dtype=torch.float32)
        expected = torch.cat([weights["layers.1.ffn.gate.weight"][i], weights["layers.1.ffn.up.weight"][i],
                              weights["layers.1.ffn.down.weight"][:, i]])
        assert torch.equal(record, expected)
    assert len(data) % ALIGNMENT == 0


def test_relu_records_carry_the_up_bias(tmp_path):
    out = tmp_path / "bundle"
    convert(make(tmp_path, "opt"), out, dtype="float32")
    bundle = Bundle(out)
    (region, parts), = bundle.regions(0)
    assert [p["name"] for p in parts] == ["up", "down", "up_bias"]
    assert region.stride == (2 * bundle.config.hidden_size + 1) * 4


def test_split_layout_has_two_aligned_regions(tmp_path):
    out = tmp_path / "bundle"
    convert(make(tmp_path, "llama"), out, layout="split")
    regions = Bundle(out).regions(0)
    assert [parts[0]["name"] for _, parts in regions] == ["gate", "down"]
    assert all(region.offset % ALIGNMENT == 0 for region, _ in regions)


def test_manifest_describes_the_bundle(tmp_path):
    source = make(tmp_path, "qwen2")
    out = tmp_path / "bundle"
    convert(source, out)
    m = json.loads((out / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION and m["family"] == "llama" and m["model_type"] == "qwen2"
    assert m["dtype"] == "float16" and m["alignment"] == 4096 and len(m["ffn"]["layers"]) == 2
    assert m["source"]["name"] == "qwen2" and len(m["source"]["sha256"]) == 64
    assert m["sizes"]["total_bytes"] == m["sizes"]["resident_bytes"] + m["sizes"]["ffn_bytes"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_cli_convert_info_verify_and_corruption(tmp_path):
    source = make(tmp_path, "llama")
    out = tmp_path / "bundle"
    result = runner.invoke(app, ["convert", str(source), str(out)])
    assert result.exit_code == 0, result.output
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "bytes per neuron record" in info.output
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    layer_file = out / "ffn" / "layer_001.bin"
    data = bytearray(layer_file.read_bytes())
    data[100] ^= 0xFF
    layer_file.write_bytes(bytes(data))
    assert_one_line_error(runner.invoke(app, ["verify", str(out)]), "layer 1", "checksum")


def test_existing_out_needs_force_and_force_replaces(tmp_path):
    source = make(tmp_path, "llama")
    out = tmp_path / "bundle"
    convert(source, out, dtype="float32")
    assert_one_line_error(runner.invoke(app, ["convert", str(source), str(out)]), "already exists", "--force")
    convert(source, out, dtype="float16", force=True)
    assert Bundle(out).manifest["dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "llama"]


def test_bad_input_leaves_nothing_behind(tmp_path, monkeypatch):
    source = make(tmp_path, "llama")
    out = tmp_path / "bundle"
    assert_one_line_error(runner.invoke(app, ["convert", str(source), str(out), "--dtype", "int3"]), "int3")
    assert_one_line_error(runner.invoke(app, ["convert", str(source), str(out), "--layout", "zigzag"]), "zigzag")
    assert_one_line_error(runner.invoke(app, ["convert", str(source), str(source / "inside")]), "inside the source")
    assert_one_line_error(runner.invoke(app, ["convert", str(source), "/proc/flashllm-bundle"]), "/proc")
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda path: shutil_usage(free=1000))
    assert_one_line_error(runner.invoke(app, ["convert", str(source), str(out)]), "not enough free disk")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def test_truncated_source_leaves_nothing_behind(tmp_path):
    source = make(tmp_path, "llama")
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert_one_line_error(runner.invoke(app, ["convert", str(source), str(tmp_path / "bundle")]), "truncated")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def test_kill_9_mid_convert_leaves_no_out_and_next_run_succeeds(tmp_path):
    source = tiny_llama(tmp_path / "big", hidden_size=256, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    out = tmp_path / "bundle"
    # a slowed-down convert in a child process, killed once it has started writing layer files
    code = ("import time, flashllm.bundle.writer as L; w = L.write_layer\n"
            "def slow(*a, **k):\n    time.sleep(0.3); return w(*a, **k)\n"
            f"L.write_layer = slow; L.convert({str(source)!r}, {str(out)!r}, dtype='float32')")
    child = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".bundle.tmp-*/ffn/layer_001.bin")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".bundle.tmp-*")), "the child never started writing"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not out.exists()
    convert(source, out, dtype="float32")  # a later run is not tripped up and cleans the leftover
    assert verify(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "bundle"]


def test_verify_reports_missing_and_truncated_layers(tmp_path):
    out = tmp_path / "bundle"
    convert(make(tmp_path, "llama"), out)
    (out / "ffn" / "layer_000.bin").unlink()
    path = out / "ffn" / "layer_001.bin"
    path.write_bytes(path.read_bytes()[:100])
    problems = verify(out)
    assert any("layer 0" in p and "missing" in p for p in problems)
    assert any("layer 1" in p and "bytes" in p for p in problems)


def test_not_a_bundle(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(FlashLLMError, match="not a flashllm bundle"):
        Bundle(tmp_path)


def test_verify_covers_the_tokenizer_and_the_predictors(tmp_path):
    from flashllm.sparsity.train import train_predictors

    out = tmp_path / "bundle"
    source = tiny_llama(tmp_path / "src", vocab_size=300)
    tiny_tokenizer(source, 300)
    convert(source, out)
    recorded = {entry["file"] for entry in Bundle(out).manifest["files"]}
    assert "tokenizer.json" in recorded and "manifest.json" not in recorded
    train_predictors(out, tokens=1500, eval_tokens=0, context=64, sparsity=0.5)
    assert verify(out) == []
    tokenizer = out / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace("<", "[", 1))
    predictors = out / "predictors.safetensors"
    data = bytearray(predictors.read_bytes())
    data[-1] ^= 0xFF
    predictors.write_bytes(bytes(data))
    problems = verify(out)
    assert any("tokenizer.json" in p for p in problems) and any(p.startswith("predictors:") for p in problems)


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    """In a log or CI a bar cannot redraw: a plain line once an interval has passed, then one per interval
    and the last; a step shorter than the interval prints nothing (an error stays one line)."""
    from flashllm import render

    source = make(tmp_path, "llama")
    result = CliRunner().invoke(app, ["convert", str(source), str(tmp_path / "quiet")])
    assert result.exit_code == 0 and "converting:" not in result.stderr
    monkeypatch.setattr(render, "PLAIN_PROGRESS_SECONDS", 0.0)  # every update is past the interval
    result = CliRunner().invoke(app, ["convert", str(source), str(tmp_path / "bundle")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("converting: ")]
    assert len(lines) > 2, result.stderr
    done, total = lines[-1].split()[1].split("/")
    assert done == total
