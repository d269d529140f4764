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
