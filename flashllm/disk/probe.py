"""`flashllm bench io`: measure random-read throughput of a disk, as in the paper's Figure 2b.

Random O_DIRECT reads of each chunk size with each number of threads, on a scratch file created next
to the given path and deleted afterwards. The result is an `IOProfile`: the cost model `FlashReader`
coalesces with, saved per device in the cache folder.
"""

from __future__ import annotations

import datetime
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from flashllm.errors import FlashLLMError
from flashllm.disk.profile import IOProfile, device_key
from flashllm.disk.system import MiB, aligned_buffer, drop_cache, open_uncached
from flashllm.paths import home

KiB = 1024
CHUNK_SIZES = (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB)
THREAD_COUNTS = (1, 4, 16, 32, 64)
QUICK_CHUNK_SIZES = (4 * KiB, 64 * KiB, MiB)
QUICK_THREAD_COUNTS = (1, 16, 32)


def run_io_bench(
    path: Path | None = None,
    quick: bool = False,
    chunk_sizes: Sequence[int] | None = None,
    thread_counts: Sequence[int] | None = None,
    seconds_per_cell: float | None = None,
    file_bytes: int | None = None,
    save: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
) -> IOProfile:
    """Measure random-read MB/s for every (chunk size, thread count) on the disk holding `path`.

    path: a folder or a file on the disk to measure (default: the cache folder). The default run takes
    under a minute (1 GiB scratch file, 30 cells of 1.2 s); quick=True a few seconds (64 MiB, 9 cells
    of 0.25 s). save=True stores the profile for this device (`IOProfile.load` finds it). progress is
    called as progress(cells_done, cells_total, label) before each cell and once at the end.
    """
    folder = Path(path) if path is not None else home()
    if folder.is_file():
        folder = folder.parent
    if path is None:
        folder.mkdir(parents=True, exist_ok=True)
    if not folder.is_dir():
        raise FlashLLMError(f"cannot benchmark {folder}: no such folder")
    chunk_sizes = sorted(chunk_sizes or (QUICK_CHUNK_SIZES if quick else CHUNK_SIZES))
    thread_counts = sorted(thread_counts or (QUICK_THREAD_COUNTS if quick else THREAD_COUNTS))
    seconds_per_cell = seconds_per_cell or (0.25 if quick else 1.2)
    file_bytes = file_bytes or (64 * MiB if quick else 1024 * MiB)
    file_bytes = max(file_bytes, 4 * max(chunk_sizes)) // max(chunk_sizes) * max(chunk_sizes)
    free = shutil.disk_usage(folder).free
    if free < 2 * file_bytes:
        raise FlashLLMError(
            f"not enough free space in {folder} for a {file_bytes >> 20} MiB scratch file ({free >> 20} MiB free)"
        )

    t0 = time.perf_counter()
    scratch = folder / f".flashllm-iobench-{os.getpid()}.tmp"
    table: dict[int, dict[int, float]] = {c: {} for c in chunk_sizes}
    cells = [(c, t) for c in chunk_sizes for t in thread_counts]
    try:
        try:
            _write_scratch(scratch, file_bytes)
        except OSError as e:
            raise FlashLLMError(f"cannot write a scratch file in {folder}: {e.strerror}") from e
        fd, direct = open_uncached(scratch)
        try:
            with ThreadPoolExecutor(max(thread_counts), thread_name_prefix="flashllm-iobench") as pool:
                for i, (chunk, threads) in enumerate(cells):
                    if progress:
                        progress(i, len(cells), f"{_size_label(chunk)} x {threads} threads")
                    seconds, nbytes = _measure(pool, fd, direct, file_bytes, chunk, threads, seconds_per_cell)
                    table[chunk][threads] = nbytes / seconds / 1e6
        finally:
            os.close(fd)
    finally:
        scratch.unlink(missing_ok=True)
    if progress:
        progress(len(cells), len(cells), "done")

    profile = IOProfile(
        table=table,
        device=device_key(folder),
        source="measured",
        direct=direct,
        measured_at=datetime.datetime.now().isoformat(timespec="seconds"),
        path=str(folder.resolve()),
        file_bytes=file_bytes,
        seconds=time.perf_counter() - t0,
    )
    if save:
        profile.save()
    return profile


def _write_scratch(path: Path, nbytes: int) -> None:
    """Fill a file with real (non-zero, non-sparse) data, then drop it from the page cache."""
    block = np.random.default_rng(0).integers(0, 256, size=4 * MiB, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        for done in range(0, nbytes, len(block)):
            f.write(block[: min(len(block), nbytes - done)])
        f.flush()
        os.fsync(f.fileno())
        drop_cache(f.fileno(), 0, nbytes)


def _measure(
    pool: ThreadPoolExecutor, fd: int, direct: bool, file_bytes: int, chunk: int, threads: int, seconds: float
) -> tuple[float, int]:
    """Random reads of `chunk` bytes from `threads` workers for about `seconds`: (elapsed, bytes)."""
    blocks = file_bytes // chunk
    start = threading.Barrier(threads + 1, timeout=60)
    deadline = [0.0]

    def worker(seed: int) -> int:
        rng = np.random.default_rng(seed)
        offsets = (rng.integers(0, blocks, size=4096) * chunk).tolist()  # reused cyclically
        buf = [aligned_buffer(chunk)]
        preadv, n = os.preadv, 0
        start.wait()
        end = deadline[0]
        while True:
            for off in offsets[(n % 4096) : (n % 4096) + 16]:
                preadv(fd, buf, off)
            n += 16
            if not direct:
                drop_cache(fd, 0, 0)  # whole file: keep measuring the disk, not the page cache
            if time.perf_counter() >= end:
                return n * chunk

    futures = [pool.submit(worker, i) for i in range(threads)]
    deadline[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.wait()
    nbytes = sum(f.result() for f in futures)
    return time.perf_counter() - t0, nbytes


def _size_label(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= MiB else f"{nbytes >> 10} KiB"


def format_profile_table(profile: IOProfile):
    """A rich Table like the paper's Figure 2b: rows chunk size, columns threads, MB/s and IOPS."""
    from rich.table import Table

    how = "O_DIRECT" if profile.direct else "buffered + DONTNEED"
    where = f" on {profile.path}" if profile.path else ""
    title = f"Random reads{where} ({how}, device {profile.device or '?'}, {profile.source})"
    table = Table(title=title, title_justify="left")
    table.add_column("chunk", justify="right")
    threads = profile.thread_counts
    for t in threads:
        table.add_column(f"{t} thread{'s' if t > 1 else ''}", justify="right")
    for chunk in profile.chunk_sizes:
        row = profile.table[chunk]
        best = max(row.values())
        cells = []
        for t in threads:
            if t not in row:
                cells.append("")
                continue
            text = f"{row[t]:,.0f} MB/s\n{_count_label(profile.iops(chunk, t))} IOPS"
            cells.append(f"[bold]{text}[/bold]" if row[t] == best else text)
        table.add_row(_size_label(chunk), *cells)
    table.caption = (
        f"per request {profile.request_seconds * 1e6:.1f} us, bandwidth {profile.bytes_per_second / 1e9:.2f} GB/s, "
        f"gaps up to {profile.merge_gap_bytes / 1024:.1f} KiB are read through, best threads {profile.best_threads}"
    )
    table.caption_justify = "left"
    return table


def _count_label(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"
