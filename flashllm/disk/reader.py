"""Reading neuron records from flash: O_DIRECT preadv thread pool, coalescing, byte and time accounting.

A bundle stores, per layer, one fixed-size record per neuron at `offset + i * stride` in a layer file.
`FlashReader.read` fetches a set of records into a caller-provided matrix:

1. sort the ids, turn each record into a byte span aligned to the device's logical block size;
2. coalesce spans into requests: adjacent records always share a request, and a gap of unneeded
   records is read through when that is cheaper than one more request (the `IOProfile` cost model);
3. cut the requests into small chunks that worker threads take one after another; a worker reads a
   chunk's requests with `os.preadv` into its own page-aligned staging buffer, copies the records out
   and takes the next chunk. One executor task per worker per call, MANY reads each: one task per
   small read would cap at ~20k IOPS.

The page cache is bypassed (O_DIRECT) so that what we measure is the flash, not RAM. Where O_DIRECT is
refused (tmpfs), reads are buffered and followed by POSIX_FADV_DONTNEED.
"""


from __future__ import annotations

import errno
import itertools
import mmap
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flashllm.disk.profile import IOProfile
from flashllm.disk.system import MiB, PAGE, aligned_buffer, drop_cache, kernel_read_bytes, logical_block_size, open_uncached
from flashllm.errors import FlashLLMError

MAX_CHUNK_REQUESTS = 16  # requests a worker takes at once: few enough to balance, enough to amortise


@dataclass(frozen=True)
class RecordRegion:
    """`count` records of `stride` bytes each, packed at `offset + i * stride` in `path`."""

    path: Path
    offset: int
    stride: int
    count: int
    name: str = ""  # "layer 3": what error messages call this region

    @property
    def end(self) -> int:
        return self.offset + self.count * self.stride


@dataclass
class ReadStats:
    """Accounting for one `FlashReader.read` call, or a running total over many.

    bytes_read is what we asked the device for (aligned spans, gaps read through included);
    kernel_bytes is the kernel's own count (/proc/self/io read_bytes, whole process), None where
    unavailable.
    """

    bytes_read: int = 0
    bytes_useful: int = 0
    requests: int = 0
    records: int = 0
    seconds: float = 0.0
    kernel_bytes: int | None = None

    def add(self, other: ReadStats) -> None:
        """Accumulate `other` into this total (kernel_bytes becomes None once any part lacks it)."""
        self.bytes_read += other.bytes_read
        self.bytes_useful += other.bytes_useful
        self.requests += other.requests
        self.records += other.records
        self.seconds += other.seconds
        if self.kernel_bytes is None or other.kernel_bytes is None:
            self.kernel_bytes = None
        else:
            self.kernel_bytes += other.kernel_bytes

    @property
    def read_amplification(self) -> float:
        """Bytes asked of the device per useful byte (>= 1: alignment and gaps read through)."""
        return self.bytes_read / self.bytes_useful if self.bytes_useful else 0.0

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes_read / self.seconds / 1e6 if self.seconds else 0.0


# ---------------------------------------------------------------------------------------------
# Coalescing.


@dataclass
class RequestPlan:
    """Records (in sorted order) grouped into aligned read requests.

    starts:  [n] byte offset of each record in the file
    first:   [m] index of each request's first record; request j holds records first[j]:first[j+1]
    begin:   [m] aligned file offset where request j starts reading
    end:     [m] aligned file offset where it stops (clipped to the aligned end of file)
    """

    starts: np.ndarray
    first: np.ndarray
    begin: np.ndarray
    end: np.ndarray

    @property
    def bytes_read(self) -> int:
        return int((self.end - self.begin).sum())


def plan_requests(
    starts: np.ndarray, stride: int, align: int, merge_gap_bytes: int, max_request_bytes: int, file_size: int
) -> RequestPlan:
    """Coalesce sorted record offsets into aligned requests.

    Runs of adjacent records become one request; a gap between runs is read through when it is at most
    `merge_gap_bytes`. A request does not cross a multiple of `max_request_bytes` in the file, so it
    spans at most that plus one record and alignment.
    """
    n = len(starts)
    file_end = -(-file_size // align) * align
    begin = starts - starts % align  # [n]
    end = np.minimum((starts + stride + align - 1) // align * align, file_end)  # [n]
    bucket = starts // max_request_bytes  # [n]
    new = np.empty(n, dtype=bool)  # [n] record i starts a new request
    new[0] = True
    np.greater(begin[1:] - end[:-1], merge_gap_bytes, out=new[1:])
    new[1:] |= bucket[1:] != bucket[:-1]
    first = np.flatnonzero(new)  # [m]
    last = np.empty_like(first)
    last[:-1] = first[1:] - 1
    last[-1] = n - 1
    return RequestPlan(starts=starts, first=first, begin=begin[first], end=end[last])


# ---------------------------------------------------------------------------------------------
# The reader.


@dataclass
class _OpenFile:
    fd: int
    size: int
    direct: bool
    align: int


@dataclass
class _Call:
    """One read call, shared by the workers that serve it.

    Requests are cut into small chunks of consecutive requests; each worker takes the next chunk from
    `next_chunk` (atomic under the GIL), reads its requests into the worker's own staging buffer, copies
    the chunk's records out, and takes another. Dynamic, so a slow worker does not leave a tail.
    """

    fd: int
    out: np.ndarray  # [n, stride]
    stride: int
    region: RecordRegion
    requests: list[tuple[int, int, int, int]]  # (file offset, staging slot, bytes asked, bytes needed)
    runs: list[tuple[int, int, int]]  # copy runs: (staging offset, first out row, rows)
    chunk_requests: list[int]  # [chunks + 1] request bounds of each chunk
    chunk_runs: list[int]  # [chunks + 1] run bounds of each chunk
    staging_bytes: int  # the largest chunk's staging
    next_chunk: Iterator[int] = field(default_factory=itertools.count)


class FlashReader:
    """Reads records of `RecordRegion`s from flash into caller-provided matrices.

    threads: worker threads (default: the profile's best_threads). profile: the cost model for
    coalescing (default: the saved profile of the device holding the first file read, else docs/DESIGN.md's
    numbers). direct: bypass the page cache (O_DIRECT). merge_gap_bytes overrides the profile's gap
    threshold (0 = never read through a gap). max_request_bytes caps one read; chunk_bytes caps a
    worker's staging per chunk (staging memory ~ threads * (chunk_bytes + max_request_bytes));
    min_requests_per_worker keeps small calls from waking more threads than they can use.
    Safe to call from several threads at once.
    """

    def __init__(
        self,
        threads: int | None = None,
        profile: IOProfile | None = None,
        direct: bool = True,
        merge_gap_bytes: int | None = None,
        max_request_bytes: int = MiB,
        chunk_bytes: int = 512 * 1024,
        min_requests_per_worker: int = 4,
    ):
        self.profile = profile
        self.direct = direct
        self.max_request_bytes = max_request_bytes
        self.chunk_bytes = chunk_bytes
        self.min_requests_per_worker = min_requests_per_worker
        self._threads = threads
        self._merge_gap_bytes = merge_gap_bytes
        self._files: dict[str, _OpenFile] = {}
        self._staging: dict[int, mmap.mmap] = {}  # thread id -> page-aligned buffer
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.totals = ReadStats(kernel_bytes=0 if kernel_read_bytes() is not None else None)

    # -- configuration ------------------------------------------------------------------------

    def _resolve_profile(self, path: Path) -> IOProfile:
        if self.profile is None:
            self.profile = IOProfile.for_path(path)
        return self.profile

    @property
    def threads(self) -> int:
        if self._threads is None:
            self._threads = (self.profile or IOProfile.default()).best_threads
        return self._threads

    @property
    def merge_gap_bytes(self) -> int:
        if self._merge_gap_bytes is not None:
            return self._merge_gap_bytes
        return (self.profile or IOProfile.default()).merge_gap_bytes

    @property
    def staging_bytes(self) -> int:
        """Memory held in staging buffers now (counts toward the process's RSS)."""
        return sum(len(b) for b in list(self._staging.values()))

    @property
    def staging_bound(self) -> int:
        """The most the staging buffers can ever hold: one per worker and one for each of two calling
        threads (the engine reads from its main thread and its prefetch thread, at once when it reads
        ahead), each a power of two covering a chunk plus one request (see `_buffer`)."""
        per_thread = 1 << (self.chunk_bytes + self.max_request_bytes - 1).bit_length()
        return (self.threads + 2) * per_thread

    # -- files --------------------------------------------------------------------------------

    def _open(self, region: RecordRegion) -> _OpenFile:
        key = os.fspath(region.path)
        f = self._files.get(key)
        if f is None:
            with self._lock:
                f = self._files.get(key)
                if f is None:
                    try:
                        fd, direct = open_uncached(key, self.direct)
                    except OSError as e:
                        raise FlashLLMError(f"{region.name or 'region'}: cannot open {key}: {e.strerror}") from e
                    size = os.fstat(fd).st_size
                    if not direct:
                        drop_cache(fd, 0, 0)  # start from the disk, not from pages cached by whoever wrote it
                    align = logical_block_size(key) if direct else PAGE
                    f = self._files[key] = _OpenFile(fd=fd, size=size, direct=direct, align=align)
        if region.end > f.size:
            raise FlashLLMError(
                f"{region.name or 'region'}: file {key} is truncated: needs {region.end} bytes, has {f.size}"
            )
        return f

    def close(self) -> None:
        """Close cached file descriptors, stop the worker threads and free staging buffers."""
        with self._lock:
            for f in self._files.values():
                os.close(f.fd)
            self._files.clear()
            self._staging.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __enter__(self) -> FlashReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading ------------------------------------------------------------------------------

    def read(self, region: RecordRegion, ids: np.ndarray, out: np.ndarray) -> ReadStats:
        """Read records `ids` of `region` into `out`: out[k] = record ids[k].

        ids: [n] unique ints in [0, region.count), any order (sorted is a little cheaper). out: uint8
        [n, stride] with contiguous rows (e.g. a row slice of a preallocated cache matrix). Returns this
        call's ReadStats and adds it to `self.totals`.
        """
        t0 = time.perf_counter()
        kernel0 = kernel_read_bytes()
        ids = np.asarray(ids)
        n, stride = len(ids), region.stride
        if ids.ndim != 1 or (n and ids.dtype.kind not in "iu"):
            raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        if out.dtype != np.uint8 or out.shape != (n, stride) or (n and out.strides[1] != 1):
            raise ValueError(f"out must be uint8 [{n}, {stride}] with contiguous rows, got {out.dtype} {out.shape}")
        if n == 0:
            return ReadStats(kernel_bytes=0 if kernel0 is not None else None)

        f = self._open(region)
        self._resolve_profile(region.path)
        ids = ids.astype(np.int64, copy=False)
        # Sorted order; rows[k] is the out row of the k-th smallest id.
        if n == 1 or bool((ids[1:] > ids[:-1]).all()):
            sorted_ids, rows = ids, None
        else:
            rows = np.argsort(ids, kind="stable")
            sorted_ids = ids[rows]
            if bool((sorted_ids[1:] == sorted_ids[:-1]).any()):
                raise ValueError(f"{region.name}: ids must be unique")
        if sorted_ids[0] < 0 or sorted_ids[-1] >= region.count:
            raise ValueError(f"{region.name}: ids must be in [0, {region.count})")

        starts = region.offset + sorted_ids * stride  # [n]
        for attempt in range(2):
            plan = plan_requests(starts, stride, f.align, self.merge_gap_bytes, self.max_request_bytes, f.size)
            try:
                self._run(self._prepare(plan, f, region, out, rows), len(plan.first))
                break
            except OSError as e:
                # A device whose sysfs block size undersells O_DIRECT's real alignment: retry at 4096.
                if e.errno == errno.EINVAL and f.direct and f.align < 4096 and attempt == 0:
                    f.align = 4096
                    continue
                raise FlashLLMError(f"{region.name}: reading {region.path} failed: {e}") from e
        if not f.direct:
            drop_cache(f.fd, int(plan.begin[0]), int(plan.end[-1] - plan.begin[0]))

        kernel1 = kernel_read_bytes()
        stats = ReadStats(
            bytes_read=plan.bytes_read,
            bytes_useful=n * stride,
            requests=len(plan.first),
            records=n,
            seconds=time.perf_counter() - t0,
            kernel_bytes=kernel1 - kernel0 if kernel0 is not None and kernel1 is not None else None,
        )
        with self._lock:
            self.totals.add(stats)
        return stats

    def _prepare(
        self, plan: RequestPlan, f: _OpenFile, region: RecordRegion, out: np.ndarray, rows: np.ndarray | None
    ) -> _Call:
        """Cut the requests into chunks and lay out each chunk's staging and copy runs."""
        m, n, stride = len(plan.first), len(plan.starts), region.stride
        lengths = plan.end - plan.begin  # [m]
        slot_len = (lengths + PAGE - 1) // PAGE * PAGE  # [m] page-aligned staging slots
        slot_end = np.cumsum(slot_len)  # [m] as if one buffer held the whole call
        # About 4 chunks per worker for balance, at most 16 requests and ~chunk_bytes of staging each.
        per_chunk = min(MAX_CHUNK_REQUESTS, max(1, m // (4 * self.threads)))
        chunk = np.maximum(np.arange(m) // per_chunk, (slot_end - slot_len) // self.chunk_bytes)  # [m]
        new_chunk = np.empty(m, dtype=bool)
        new_chunk[0] = True
        new_chunk[1:] = chunk[1:] != chunk[:-1]
        chunk_first = np.flatnonzero(new_chunk)  # [chunks]
        chunk_base = np.repeat(slot_end[chunk_first] - slot_len[chunk_first], np.diff(np.append(chunk_first, m)))
        slot = slot_end - slot_len - chunk_base  # [m] staging offset within the chunk
        staging_bytes = int((slot + slot_len).max())

        # Where each record sits in its chunk's staging, and which out row it goes to.
        rec_count = np.diff(np.append(plan.first, n))  # [m]
        src = plan.starts + np.repeat(slot - plan.begin, rec_count)  # [n]
        dst = np.arange(n) if rows is None else rows  # [n]
        needs = plan.starts[plan.first + rec_count - 1] + stride - plan.begin  # [m]

        # Copy runs: records contiguous in staging AND in out, within one chunk, copy as one block.
        chunk_rec = np.append(plan.first[chunk_first], n)  # [chunks + 1] record bounds
        new_run = np.empty(n, dtype=bool)
        new_run[0] = True
        new_run[1:] = (src[1:] != src[:-1] + stride) | (dst[1:] != dst[:-1] + 1)
        new_run[chunk_rec[:-1]] = True
        run_first = np.flatnonzero(new_run)  # [runs]
        run_len = np.diff(np.append(run_first, n))

        return _Call(
            fd=f.fd,
            out=out,
            stride=stride,
            region=region,
            requests=list(zip(plan.begin.tolist(), slot.tolist(), lengths.tolist(), needs.tolist(), strict=True)),
            runs=list(zip(src[run_first].tolist(), dst[run_first].tolist(), run_len.tolist(), strict=True)),
            chunk_requests=np.append(chunk_first, m).tolist(),
            chunk_runs=np.searchsorted(run_first, chunk_rec).tolist(),
            staging_bytes=staging_bytes,
        )

    def _run(self, call: _Call, n_requests: int) -> None:
        """Serve `call` with enough workers to keep the device busy, the calling thread among them."""
        n_chunks = len(call.chunk_requests) - 1
        # Not so many workers that thread handoffs cost more than the reads they overlap.
        workers = min(self.threads, n_chunks, -(-n_requests // self.min_requests_per_worker))
        if workers <= 1:
            self._work(call)
            return
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="flashllm-io")
        futures = [self._pool.submit(self._work, call) for _ in range(workers - 1)]
        error = None
        try:
            self._work(call)
        except BaseException as e:  # still wait for the others: they write into `out`
            error = e
        for fut in futures:
            try:
                fut.result()
            except BaseException as e:
                error = error or e
        if error is not None:
            raise error

    def _buffer(self, nbytes: int) -> mmap.mmap:
        """This thread's staging buffer, grown (never shrunk) to at least `nbytes` (a power of two)."""
        key = threading.get_ident()
        buf = self._staging.get(key)
        if buf is None or len(buf) < nbytes:
            buf = self._staging[key] = aligned_buffer(max(64 * 1024, 1 << (nbytes - 1).bit_length()))
        return buf

    def _work(self, call: _Call) -> None:
        """Take chunks of `call` until none is left: read each into staging, copy its records out."""
        buf = self._buffer(call.staging_bytes)
        view = memoryview(buf)
        staged = np.frombuffer(buf, dtype=np.uint8)
        fd, out, stride, preadv = call.fd, call.out, call.stride, os.preadv
        requests, runs, chunk_requests, chunk_runs = call.requests, call.runs, call.chunk_requests, call.chunk_runs
        n_chunks = len(chunk_requests) - 1
        try:
            for c in call.next_chunk:
                if c >= n_chunks:
                    break
                for off, slot, length, need in requests[chunk_requests[c] : chunk_requests[c + 1]]:
                    got = preadv(fd, [view[slot : slot + length]], off)
                    if got < need:
                        raise FlashLLMError(
                            f"{call.region.name}: short read from {call.region.path} at offset {off}: got {got} "
                            f"of {need} bytes (was the file truncated while open?)"
                        )
                for src, row, count in runs[chunk_runs[c] : chunk_runs[c + 1]]:
                    out[row : row + count] = staged[src : src + count * stride].reshape(count, stride)
        finally:
            del staged
            view.release()
