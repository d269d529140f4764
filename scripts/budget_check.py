"""Does the kernel hold flashllm to its --dram-budget? Run generate once freely, then inside a memory
cgroup capped at budget + the measured fixed overhead; it must finish and read no more bytes.

    python scripts/budget_check.py BUNDLE --budget 50% [--tokens 32] [--prompt TEXT]
"""

import argparse
import json
import sys

from flashllm.measure.cgroup import cgroup_unavailable_reason, run_capped


def run(cmd, limit=None):
    import subprocess

    if limit is None:
        result = subprocess.run(cmd, capture_output=True, text=True)
        return result.returncode, result.stdout, result.stderr, None, False
    capped = run_capped(cmd, limit)
    return capped.returncode, capped.stdout, capped.stderr, capped.max_usage_bytes, capped.oom_killed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("--budget", default="50%")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--extra", nargs="*", default=[], help="more generate options, e.g. --policy pinned")
    args = parser.parse_args()
    reason = cgroup_unavailable_reason()
    if reason:
        print(f"cannot check under a cgroup here: {reason}")
        return 2
    cmd = [sys.executable, "-m", "flashllm", "generate", args.bundle, args.prompt, "--dram-budget", args.budget,
           "-n", str(args.tokens), "--stats", "json", *args.extra]
    code, out, err, _, _ = run(cmd)
    if code != 0:
        print(err)
        return 1
    free = json.loads(err.strip().splitlines()[-1])
    limit = free["budget_bytes"] + free["overhead_bytes"]
    code, capped_out, capped_err, cgroup_peak, oom = run(cmd, limit)
    print(f"budget {free['budget_bytes'] / 1e6:.1f} MB + overhead {free['overhead_bytes'] / 1e6:.1f} MB "
          f"= cgroup limit {limit / 1e6:.1f} MB")
    print(f"free run:   peak RSS {free['peak_rss_bytes'] / 1e6:.1f} MB, {free['bytes_read'] / 1e6:.1f} MB read "
          f"(kernel {free['kernel_bytes_read'] / 1e6:.1f} MB), {free['tokens_per_s']:.2f} tokens/s")
    if code != 0:
        print(f"capped run FAILED (exit {code}{', OOM-killed' if oom else ''}): {capped_err.strip()[-300:]}")
        return 1
    capped = json.loads(capped_err.strip().splitlines()[-1])
    print(f"capped run: peak RSS {capped['peak_rss_bytes'] / 1e6:.1f} MB, cgroup peak {cgroup_peak / 1e6:.1f} MB, "
          f"{capped['bytes_read'] / 1e6:.1f} MB read (kernel {capped['kernel_bytes_read'] / 1e6:.1f} MB), "
          f"{capped['tokens_per_s']:.2f} tokens/s")
    same_text = capped_out == out
    ok = capped["bytes_read"] <= free["bytes_read"] and same_text
    print(f"same text: {same_text}; bytes read capped <= free: {capped['bytes_read'] <= free['bytes_read']}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
