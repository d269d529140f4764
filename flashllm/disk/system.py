"""What the operating system tells and gives us: uncached file access, aligned buffers, the kernel's
byte count, our own memory (RSS, peak), and handing freed heap back. Nothing about models."""

from __future__ import annotations

import errno
import mmap
import os
import resource
import warnings
from pathlib import Path

PAGE = mmap.PAGESIZE
MiB = 1 << 20

_proc_io: tuple[int, int] | None = None  # (pid, fd of /proc/self/io)


def kernel_read_bytes() -> int | None:
    """Bytes this process has made the kernel fetch from storage (/proc/self/io read_bytes), or None."""
    global _proc_io
    try:
        if _proc_io is None or _proc_io[0] != os.getpid():  # reopen after fork
            _proc_io = (os.getpid(), os.open("/proc/self/io", os.O_RDONLY))
        text = os.pread(_proc_io[1], 4096, 0)
        i = text.index(b"read_bytes:") + 11
        return int(text[i : text.index(b"\n", i)])
    except (OSError, ValueError):
        return None


def logical_block_size(path: Path | str) -> int:
    """The logical block size of the device holding `path` (sysfs), else 4096."""
    st = os.stat(path)
    dev = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for q in (f"{dev}/queue/logical_block_size", f"{dev}/../queue/logical_block_size"):  # disk, partition
        try:
            size = int(Path(q).read_text())
        except (OSError, ValueError):
            continue
        if size >= 512 and size & (size - 1) == 0:
            return size
    return 4096


_warned_buffered = False


def open_uncached(path: Path | str, direct: bool = True) -> tuple[int, bool]:
    """Open `path` read-only bypassing the page cache where possible: (fd, is_direct).

    O_DIRECT on Linux (F_NOCACHE on macOS). Where the filesystem refuses it (tmpfs: EINVAL), the file
    is opened buffered and a one-time warning says so; callers then drop pages with DONTNEED.
    """
    global _warned_buffered
    o_direct = getattr(os, "O_DIRECT", 0)
    if direct and o_direct:
        try:
            return os.open(path, os.O_RDONLY | o_direct), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            if not _warned_buffered:
                _warned_buffered = True
                warnings.warn(
                    f"O_DIRECT is not supported for {path} (tmpfs?); using buffered reads + "
                    "POSIX_FADV_DONTNEED, so timings may reflect RAM, not flash",
                    RuntimeWarning,
                    stacklevel=3,
                )
    fd = os.open(path, os.O_RDONLY)
    if direct and not o_direct:
        try:
            import fcntl

            fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)  # macOS
        except (ImportError, AttributeError, OSError):
            pass
    return fd, False


def drop_cache(fd: int, offset: int, length: int) -> None:
    """Evict a byte range from the page cache (after buffered reads)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Anonymous page-aligned memory, as O_DIRECT requires."""
    return mmap.mmap(-1, max(PAGE, -(-nbytes // PAGE) * PAGE))




def peak_rss() -> int:
    """The process's peak RSS (VmHWM). Not getrusage's ru_maxrss, which keeps the peak of the image a
    forked child had before exec (a large parent shows up as our peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def release_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


MMAP_THRESHOLD = 256 * 1024  # C allocations above this are mapped and unmapped, never kept in the heap
MALLOC_ARENAS = 2


def start_runtime() -> None:
    """What torch sets up on first use, done before the fixed overhead is measured: its intra-op thread
    team (started by the first parallel op; each thread's stack otherwise counted against the budget)."""
    import torch  # only here: the rest of this module serves code that never loads torch

    torch.ones(1 << 17).sum()  # above torch's grain size: the OpenMP team starts


def bound_heap() -> None:
    """Make glibc's malloc keep little beyond what is live, for the whole process (elsewhere nothing).

    By default glibc raises its mmap threshold to the size of any mapped block that is freed (up to
    32 MiB, reached while weights load), so every later temporary below that comes from the heap and
    its pages stay there once freed, in holes between live blocks: whether a layer's temporaries found
    a hole or grew the heap moved the peak by several MB from run to run. A fixed threshold (which also
    stops the raising) maps every larger block and unmaps it when freed; the heap's free top goes back
    above twice that. And each thread that mallocs (reader threads, torch's intra-op threads) would get
    an arena of its own, up to 8 per core, each keeping its own free blocks: two arenas in all."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # glibc's malloc.h
        libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)
        libc.mallopt(m_trim_threshold, 2 * MMAP_THRESHOLD)
        libc.mallopt(m_arena_max, MALLOC_ARENAS)
    except (OSError, AttributeError):
        pass
