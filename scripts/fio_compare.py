#!/usr/bin/env python3
"""Compare flashllm's FlashReader with fio on the same file: random O_DIRECT reads at 4 KiB and 64 KiB.

    python scripts/fio_compare.py [--file /var/tmp/flashllm-fio.bin] [--seconds 5] [--threads 32]

fio runs with direct=1, iodepth=32, rw=randread, ioengine=libaio (io_uring with --engine io_uring) on a
1 GiB file; our reader reads the same file as a region of records of the chunk size, with ids that are
never adjacent (sorted, as the engine passes them) and gap merging off, so that every record is one
request (like fio's blocks). fio and
ours alternate over a few rounds and each of our runs is compared with the fio runs on either side of
it, because this disk's speed drifts from minute to minute.
Installs fio with apt-get when it is missing (as root).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from flashllm.disk.reader import FlashReader, ReadStats, RecordRegion


def ensure_fio() -> str:
    fio = shutil.which("fio")
    if fio:
        return fio
    if os.geteuid() != 0:
        sys.exit("fio is not installed; run: sudo apt-get install -y fio")
    print("installing fio with apt-get ...", file=sys.stderr)
    if subprocess.run(["apt-get", "install", "-y", "fio"], capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "fio"], check=True, capture_output=True)
    return shutil.which("fio") or sys.exit("fio install failed")


def make_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    print(f"writing {size >> 20} MiB to {path} ...", file=sys.stderr)
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def run_fio(fio: str, path: Path, size: int, bs: int, seconds: float, engine: str, iodepth: int) -> tuple[float, float]:
    """(MB/s, IOPS) of fio random reads."""
    cmd = [
        fio, "--name=randread", f"--filename={path}", f"--size={size}", "--rw=randread", f"--bs={bs}",
        "--direct=1", f"--ioengine={engine}", f"--iodepth={iodepth}", f"--runtime={seconds}", "--time_based",
        "--norandommap", "--output-format=json",
    ]  # fmt: skip
    job = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["jobs"][0]["read"]
    return job["bw_bytes"] / 1e6, job["iops"]


def run_ours(
    path: Path, size: int, bs: int, seconds: float, threads: int | None, batch: int, sort: bool = True
) -> tuple[float, float, int]:
    """(MB/s, IOPS, threads) of FlashReader reading `batch` random non-adjacent records per call."""
    count = size // bs
    region = RecordRegion(path, 0, bs, count, f"{bs >> 10} KiB records")
    out = np.empty((batch, bs), dtype=np.uint8)  # [batch, bs]
    rng = np.random.default_rng(0)
    with FlashReader(threads=threads, merge_gap_bytes=0) as reader:
        reader.read(region, np.arange(0, 2 * batch, 2), out)  # warm up the pool and staging buffers
        total = ReadStats()
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            ids = 2 * rng.choice(count // 2, size=batch, replace=False)  # never adjacent: one request each
            if sort:
                ids.sort()  # as the engine passes them (from a mask); unsorted costs an argsort and row scatter
            total.add(reader.read(region, ids, out))
        return total.bytes_read / total.seconds / 1e6, total.requests / total.seconds, reader.threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path, default=Path("/var/tmp/flashllm-fio.bin"))
    ap.add_argument("--size", type=int, default=1 << 30)
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each fio run and each of ours")
    ap.add_argument("--rounds", type=int, default=5, help="fio, ours, fio, ours, ..., fio")
    ap.add_argument("--unsorted", action="store_true", help="pass ids to read() in random order")
    ap.add_argument("--threads", type=int, default=None, help="reader threads (default: the saved I/O profile's)")
    ap.add_argument("--batch", type=int, default=None, help="records per read() call (default: 2048 / 512)")
    ap.add_argument("--engine", default="libaio", choices=["libaio", "io_uring"])
    ap.add_argument("--iodepth", type=int, default=32)
    ap.add_argument("--keep", action="store_true", help="keep the test file")
    args = ap.parse_args()

    fio = ensure_fio()
    make_file(args.file, args.size)
    targets = {4096: 0.60, 65536: 0.80}
    rows = []
    try:
        for bs, target in targets.items():
            batch = args.batch or (2048 if bs <= 4096 else 512)
            fios = [run_fio(fio, args.file, args.size, bs, args.seconds, args.engine, args.iodepth)]
            ours = []
            for _ in range(args.rounds):
                ours.append(run_ours(args.file, args.size, bs, args.seconds, args.threads, batch, not args.unsorted))
                fios.append(run_fio(fio, args.file, args.size, bs, args.seconds, args.engine, args.iodepth))
            # Each of our runs against the mean of the fio runs just before and after it.
            ratios = [o[0] / ((fios[i][0] + fios[i + 1][0]) / 2) for i, o in enumerate(ours)]
            fio_mb = float(np.median([f[0] for f in fios]))
            fio_iops = float(np.median([f[1] for f in fios]))
            mb, iops = float(np.median([o[0] for o in ours])), float(np.median([o[1] for o in ours]))
            rows.append((bs, fio_mb, fio_iops, mb, iops, ours[0][2], batch, float(np.median(ratios)), ratios, target))
    finally:
        if not args.keep:
            args.file.unlink(missing_ok=True)

    print(
        f"fio: {args.engine}, iodepth={args.iodepth}, direct=1, randread, {args.size >> 20} MiB file; "
        f"{args.rounds} rounds of {args.seconds:g} s (fio / ours alternating), medians"
    )
    print(
        f"{'chunk':>7} {'fio MB/s':>9} {'fio IOPS':>9} {'ours MB/s':>10} {'ours IOPS':>10} {'threads':>7} "
        f"{'batch':>6} {'ours/fio':>8} {'(per round)':>16} {'target':>6}"
    )
    ok = True
    for bs, fio_mb, fio_iops, mb, iops, threads, batch, ratio, ratios, target in rows:
        ok &= ratio >= target
        per_round = "/".join(f"{r:.0%}" for r in ratios)
        print(
            f"{bs >> 10:>5}Ki {fio_mb:>9.0f} {fio_iops:>9.0f} {mb:>10.0f} {iops:>10.0f} {threads:>7} "
            f"{batch:>6} {ratio:>8.0%} {per_round:>16} {target:>6.0%}"
        )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
