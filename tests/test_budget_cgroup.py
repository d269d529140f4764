"""The kernel holds generate to its budget: inside a memory cgroup capped at budget + the measured
overhead it must finish, print the same text and read no more bytes than without the cap."""

import json
import sys

import pytest

from flashllm.measure.cgroup import cgroup_unavailable_reason, run_capped

pytestmark = pytest.mark.realmodel
REASON = cgroup_unavailable_reason()


@pytest.mark.skipif(REASON is not None, reason=f"no memory cgroup: {REASON}")
@pytest.mark.parametrize("kind", ["float16", "quantized"])
def test_generate_within_budget_under_a_memory_cgroup(kind, request):
    import subprocess

    bundle = request.getfixturevalue("smollm2_bundle" if kind == "float16" else "smollm2_quantized_bundle")
    cmd = [sys.executable, "-m", "flashllm", "generate", str(bundle), "The capital of France is",
           "--dram-budget", "50%" if kind == "float16" else "70%", "-n", "6", "--stats", "json"]
    free = subprocess.run(cmd, capture_output=True, text=True)
    assert free.returncode == 0, free.stderr
    stats = json.loads(free.stderr.strip().splitlines()[-1])
    assert stats["peak_rss_bytes"] <= stats["budget_bytes"] + stats["overhead_bytes"]
    capped = run_capped(cmd, stats["budget_bytes"] + stats["overhead_bytes"], timeout=600)
    assert capped.returncode == 0 and not capped.oom_killed, capped.stderr[-500:]
    capped_stats = json.loads(capped.stderr.strip().splitlines()[-1])
    assert capped.stdout == free.stdout
    assert capped_stats["bytes_read"] <= stats["bytes_read"]
    assert capped_stats["kernel_bytes_read"] >= 0.9 * capped_stats["bytes_read"]


@pytest.fixture
def busy_cores():
    """Two processes spinning on the cores for the test's length: the promise must hold under contention."""
    import subprocess

    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for p in spinners:
        p.kill()
        p.wait()


LONG_PROMPT = ("Flash memory keeps the weights; DRAM keeps what the next tokens need. " * 30).strip()
CASES = {  # name -> (bundle fixture, arguments after the bundle)
    "sampling": ("smollm2_bundle", ["The capital of France is", "--temperature", "0.9", "--top-p", "0.9",
                                    "--seed", "3", "--dram-budget", "50%", "-n", "8"]),
    "chat": ("smollm2_bundle", ["What is the capital of France?", "--chat", "--dram-budget", "60%", "-n", "8"]),
    "long-prompt": ("smollm2_bundle", [LONG_PROMPT, "--dram-budget", "60%", "-n", "4"]),
    "quantized-sampling": ("smollm2_quantized_bundle", ["def fib(n):", "--temperature", "0.7", "--seed", "1",
                                                        "--dram-budget", "70%", "-n", "8"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peak_within_budget_under_contention(case, busy_cores, request):
    """Sampling, the chat path and a long prompt's prefill, with the two cores busy with other work."""
    import subprocess

    fixture, args = CASES[case]
    bundle = request.getfixturevalue(fixture)
    run = subprocess.run([sys.executable, "-m", "flashllm", "generate", str(bundle), *args, "--stats", "json"],
                         capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-800:]
    stats = json.loads(run.stderr.strip().splitlines()[-1])
    assert stats["tokens"] > 0
    over = stats["peak_rss_bytes"] - stats["budget_bytes"] - stats["overhead_bytes"]
    assert over <= 0, f"peak {over / 1e6:.1f} MB above budget + overhead"
