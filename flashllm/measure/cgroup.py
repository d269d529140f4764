"""Run a command inside a memory cgroup: the kernel holds it to a real cap (v1 or v2, as root).

This is how the budget promise is checked, and how the page-cache peer (an mmap runtime such as
llama.cpp) is measured under the same cap.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")


@dataclass
class CappedRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    limit_bytes: int
    max_usage_bytes: int | None  # the cgroup's peak (includes page cache it was charged for)
    oom_killed: bool


def cgroup_unavailable_reason() -> str | None:
    """None if a memory cgroup can be made here, else why not."""
    if os.geteuid() != 0:
        return "memory cgroups need root"
    root = _root()
    if root is None:
        return "no memory cgroup hierarchy (cgroup v1 memory or v2 with the memory controller)"
    try:
        probe = root / f"flashllm-probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        return f"cannot create a cgroup under {root}: {e.strerror}"
    return None


def _root() -> Path | None:
    if (V1 / "memory.limit_in_bytes").exists():
        return V1
    controllers = V2 / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return V2
    return None


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int):
    """A fresh memory cgroup capped at limit_bytes (RSS + charged page cache, no swap); yields
    (preexec_fn that moves a child into it, the group's folder). Removed on exit."""
    root = _root()
    if root is None or os.geteuid() != 0:
        raise RuntimeError(cgroup_unavailable_reason() or "no memory cgroup")
    group = root / f"flashllm-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    try:
        if root == V1:
            (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
            swap = group / "memory.memsw.limit_in_bytes"
            if swap.exists():
                swap.write_text(str(limit_bytes))
        else:
            (group / "memory.max").write_text(str(limit_bytes))
            if (group / "memory.swap.max").exists():
                (group / "memory.swap.max").write_text("0")
        procs = str(group / "cgroup.procs")

        def enter():  # runs in the child before exec: the whole command lives in the group
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        yield enter, group
    finally:
        for _ in range(50):  # the group can be removed once its last process is gone
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def cgroup_peak(group: Path) -> int | None:
    v1 = (group / "memory.max_usage_in_bytes")
    peak_file = v1 if v1.exists() else group / "memory.peak"
    return int(peak_file.read_text()) if peak_file.exists() else None


def run_capped(cmd: list[str], limit_bytes: int, env: dict | None = None, timeout: float | None = None) -> CappedRun:
    """Run cmd with its memory capped at limit_bytes; report its exit, output, peak and OOM kills."""
    with memory_cgroup(limit_bytes) as (enter, group):
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=enter, timeout=timeout)
        seconds = time.perf_counter() - start
        oom = oom_killed(group) or result.returncode in (-9, 137)
        return CappedRun(result.returncode, result.stdout, result.stderr, seconds, limit_bytes, cgroup_peak(group), oom)


def oom_killed(group: Path) -> bool:
    if (group / "memory.oom_control").exists():
        text = (group / "memory.oom_control").read_text()
    else:
        events = group / "memory.events"
        text = events.read_text() if events.exists() else ""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and int(value or 0) > 0:
            return True
    return False


def drop_file_cache(path: Path) -> None:
    """Evict a file from the page cache (posix_fadvise DONTNEED), so the next reads reach the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
