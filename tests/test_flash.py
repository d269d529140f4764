"""FlashReader: exact bytes, real device reads, errors, tmpfs fallback, coalescing; the quick I/O bench."""

import errno
import os
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from flashllm.errors import FlashLLMError
from flashllm.disk import profile as disk_profile
from flashllm.disk import system as disk_system
from flashllm.disk.profile import IOProfile
from flashllm.disk.reader import FlashReader, ReadStats, RecordRegion, plan_requests
from flashllm.disk.system import kernel_read_bytes

RAM_FILESYSTEMS = {"tmpfs", "ramfs", "devtmpfs"}


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding `path` (longest matching mount point)."""
    path = str(Path(path).resolve())
    best, kind = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            _, mount, fstype, *_ = line.split()
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, kind = mount, fstype
    return kind


@pytest.fixture
def disk_dir(tmp_path):
    """A folder on a real disk (not tmpfs): tmp_path where it is one, else under /var/tmp."""
    if not Path("/proc/mounts").exists():
        yield tmp_path
        return
    if fs_type(tmp_path) not in RAM_FILESYSTEMS:
        yield tmp_path
        return
    if Path("/var/tmp").is_dir() and fs_type(Path("/var/tmp")) not in RAM_FILESYSTEMS:
        with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
            yield Path(d)
        return
    pytest.skip("no disk-backed temporary folder (tmp_path and /var/tmp are on tmpfs)")


def write_layer(path: Path, offset: int, stride: int, count: int, tail: int = 0, seed: int = 0) -> np.ndarray:
    """A layer file with random records at offset + i * stride; returns the records [count, stride]."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=offset + count * stride + tail, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(data.tobytes())
        os.fsync(f.fileno())  # written back, so that DONTNEED can drop it from the page cache
    return data[offset : offset + count * stride].reshape(count, stride)


def read(reader: FlashReader, region: RecordRegion, ids) -> tuple[np.ndarray, ReadStats]:
    ids = np.asarray(ids, dtype=np.int64)
    out = np.full((len(ids), region.stride), 0xAB, dtype=np.uint8)  # [n, stride]
    stats = reader.read(region, ids, out)
    return out, stats


ID_CASES = {
    "first": lambda n: [0],
    "last": lambda n: [n - 1],
    "adjacent": lambda n: list(range(5, 15)),
    "scattered": lambda n: [1, 7, 40, 41, 90, n - 2],
    "gaps": lambda n: [0, 2, 5, 9, 14, 20, 60, 61, 62, 100],
    "end_of_file": lambda n: [n - 3, n - 2, n - 1],
    "unsorted": lambda n: [n - 1, 3, 50, 2, 0, 51, 17],
    "all": lambda n: list(range(n)),
    "all_reversed": lambda n: list(range(n))[::-1],
}


@pytest.mark.parametrize("stride,offset", [(3456, 0), (9216, 3 * 4096), (4096, 4096), (100, 8192)])
@pytest.mark.parametrize("case", list(ID_CASES))
def test_bytes_match_file(disk_dir, stride, offset, case):
    count = 123
    path = disk_dir / "layer.bin"
    records = write_layer(path, offset, stride, count)
    region = RecordRegion(path, offset, stride, count, "layer 0")
    ids = ID_CASES[case](count)
    with FlashReader(threads=4) as reader:
        out, stats = read(reader, region, ids)
    np.testing.assert_array_equal(out, records[ids])
    assert stats.records == len(ids) and stats.bytes_useful == len(ids) * stride
    assert stats.bytes_read >= stats.bytes_useful and stats.requests >= 1


@pytest.mark.parametrize("merge_gap_bytes", [0, 50_000, None])
@pytest.mark.parametrize("max_request_bytes", [8192, 4 << 20])
def test_bytes_match_file_under_any_plan(disk_dir, merge_gap_bytes, max_request_bytes):
    """Gap merging, request splitting and many tasks must not change what is delivered."""
    stride, count = 3456, 2000
    path = disk_dir / "layer.bin"
    records = write_layer(path, 4096, stride, count, tail=77)
    region = RecordRegion(path, 4096, stride, count, "layer 1")
    rng = np.random.default_rng(1)
    ids = rng.choice(count, size=700, replace=False)  # unsorted
    with FlashReader(threads=8, merge_gap_bytes=merge_gap_bytes, max_request_bytes=max_request_bytes,
                     min_requests_per_worker=1) as reader:  # fmt: skip
        out, stats = read(reader, region, ids)
        np.testing.assert_array_equal(out, records[ids])
        out, _ = read(reader, region, np.sort(ids))
        np.testing.assert_array_equal(out, records[np.sort(ids)])
    if merge_gap_bytes == 0:
        assert stats.requests > 100


def test_out_may_be_rows_of_a_bigger_matrix(disk_dir):
    stride, count = 9216, 64
    path = disk_dir / "layer.bin"
    records = write_layer(path, 0, stride, count)
    region = RecordRegion(path, 0, stride, count, "layer 2")
    ids = np.array([9, 3, 40, 41, 42, 63])
    cache = np.zeros((20, stride + 128), dtype=np.uint8)  # wider rows: out rows are contiguous, out is not
    with FlashReader(threads=2) as reader:
        reader.read(region, ids, cache[7 : 7 + len(ids), :stride])
    np.testing.assert_array_equal(cache[7 : 7 + len(ids), :stride], records[ids])
    assert not cache[:7].any() and not cache[7 + len(ids) :].any() and not cache[:, stride:].any()


def test_rereading_reaches_the_device(disk_dir):
    if kernel_read_bytes() is None:
        pytest.skip("/proc/self/io is not available")
    stride, count = 3456, 500
    path = disk_dir / "layer.bin"
    records = write_layer(path, 0, stride, count)
    region = RecordRegion(path, 0, stride, count, "layer 3")
    ids = np.arange(0, count, 3)
    for direct in (True, False):  # O_DIRECT, and buffered + DONTNEED
        with warnings.catch_warnings(), FlashReader(direct=direct, threads=4) as reader:
            warnings.simplefilter("ignore")
            for _ in range(2):
                out, stats = read(reader, region, ids)
                np.testing.assert_array_equal(out, records[ids])
                assert stats.kernel_bytes is not None and stats.kernel_bytes >= stats.bytes_useful, (direct, stats)
            assert reader.totals.kernel_bytes >= 2 * reader.totals.bytes_useful
            assert reader.totals.records == 2 * len(ids)


def test_truncated_file_names_the_layer(disk_dir):
    stride, count = 3456, 100
    path = disk_dir / "layer.bin"
    write_layer(path, 4096, stride, count - 1, tail=100)  # one record short
    region = RecordRegion(path, 4096, stride, count, "layer 3")
    with (
        FlashReader() as reader,
        pytest.raises(FlashLLMError, match=r"layer 3: .* is truncated: needs \d+ bytes, has \d+"),
    ):
        read(reader, region, [0])


def test_missing_file_is_a_clean_error(tmp_path):
    with FlashReader() as reader, pytest.raises(FlashLLMError, match="layer 7: cannot open"):
        read(reader, RecordRegion(tmp_path / "nope.bin", 0, 4096, 1, "layer 7"), [0])


def test_bad_ids_are_rejected(disk_dir):
    path = disk_dir / "layer.bin"
    write_layer(path, 0, 3456, 10)
    region = RecordRegion(path, 0, 3456, 10, "layer 0")
    with FlashReader() as reader:
        with pytest.raises(ValueError, match="unique"):
            read(reader, region, [3, 1, 3])
        with pytest.raises(ValueError, match=r"\[0, 10\)"):
            read(reader, region, [2, 10])
        with pytest.raises(ValueError, match="out must be"):
            reader.read(region, np.array([1]), np.zeros((1, 100), dtype=np.uint8))
        out, stats = read(reader, region, [])
        assert out.shape == (0, 3456) and stats.bytes_read == 0


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
@pytest.mark.parametrize("refuse_direct", [False, True])
def test_buffered_fallback_on_tmpfs(monkeypatch, refuse_direct):
    """tmpfs refuses O_DIRECT before Linux 6.6; newer kernels accept it, so the refusal is also simulated."""
    monkeypatch.setattr(disk_system, "_warned_buffered", False)
    if refuse_direct:
        real_open = os.open

        def open_without_direct(path, flags, *args, **kwargs):
            if flags & getattr(os, "O_DIRECT", 0):
                raise OSError(errno.EINVAL, "Invalid argument", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", open_without_direct)
    stride, count = 9216, 50
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        path = Path(d) / "layer.bin"
        records = write_layer(path, 4096, stride, count)
        region = RecordRegion(path, 4096, stride, count, "layer 4")
        ids = [49, 0, 10, 11, 30]
        with FlashReader() as reader, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, _ = read(reader, region, ids)
            np.testing.assert_array_equal(out, records[ids])
            out, _ = read(reader, region, ids[::-1])
            np.testing.assert_array_equal(out, records[ids[::-1]])
            direct = reader._files[str(path)].direct
        fallback = [w for w in caught if "O_DIRECT" in str(w.message)]
        assert len(fallback) == (0 if direct else 1)  # warned once, only where O_DIRECT was refused
        if refuse_direct:
            assert not direct


def test_concurrent_calls_share_one_reader(disk_dir):
    stride, count = 3456, 1000
    path = disk_dir / "layer.bin"
    records = write_layer(path, 0, stride, count)
    region = RecordRegion(path, 0, stride, count, "layer 5")
    errors = []

    def worker(seed):
        try:
            ids = np.random.default_rng(seed).choice(count, size=300, replace=False)
            for _ in range(3):
                out, _ = read(reader, region, ids)
                np.testing.assert_array_equal(out, records[ids])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with FlashReader(threads=4) as reader:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


def profile_with_gap(gap_bytes: int) -> IOProfile:
    """A profile whose cost model reads through gaps of up to `gap_bytes` (1 GB/s bandwidth)."""
    return IOProfile(table={4096: {16: 4096 / (gap_bytes / 1e9) / 1e6}, 1 << 20: {16: 1000.0}})


def test_coalescing_follows_the_cost_model():
    stride, align = 3456, 512
    profile = profile_with_gap(16 * 1024)
    assert abs(profile.merge_gap_bytes - 16 * 1024) <= 1
    ids = np.array([0, 1, 2, 5, 6, 100, 101, 300])  # gap of 2 records (~7 KiB): merged; 93 records: not
    starts = ids * stride
    plan = plan_requests(starts, stride, align, profile.merge_gap_bytes, 4 << 20, 400 * stride)
    assert plan.first.tolist() == [0, 5, 7]
    assert plan.begin.tolist() == [0, 100 * stride // align * align, 300 * stride // align * align]
    assert (plan.begin % align == 0).all() and (plan.end % align == 0).all()
    # A costlier request makes the 93-record gap worth reading through too.
    plan = plan_requests(starts, stride, align, profile_with_gap(400_000).merge_gap_bytes, 4 << 20, 400 * stride)
    assert len(plan.first) == 2
    # Never merge with a zero gap threshold, except records sharing a block.
    plan = plan_requests(starts, stride, align, 0, 4 << 20, 400 * stride)
    assert plan.first.tolist() == [0, 3, 5, 7]
    # The request size cap splits a long run.
    plan = plan_requests(np.arange(100) * stride, stride, align, 0, 64 * 1024, 100 * stride)
    assert len(plan.first) == -(-100 * stride // (64 * 1024))
    assert ((plan.end - plan.begin) <= 64 * 1024 + stride + align).all()


def test_reader_coalesces_with_its_profile(disk_dir):
    stride, count = 3456, 400
    path = disk_dir / "layer.bin"
    records = write_layer(path, 0, stride, count)
    region = RecordRegion(path, 0, stride, count, "layer 6")
    ids = np.array([0, 1, 2, 5, 6, 100, 101, 300])
    for gap, requests in [(16 * 1024, 3), (0, 4)]:
        with FlashReader(profile=profile_with_gap(gap) if gap else None, merge_gap_bytes=None if gap else 0) as reader:
            out, stats = read(reader, region, ids)
        np.testing.assert_array_equal(out, records[ids])
        assert stats.requests == requests


def test_io_profile_default_save_load(tmp_path):
    default = IOProfile.default()
    assert default.source == "default"
    assert 15e-6 < default.request_seconds < 25e-6  # ~50k reads/s
    assert 0.9e9 < default.bytes_per_second < 1.1e9  # ~1 GB/s
    assert default.best_threads == 32  # the paper's choice too
    assert IOProfile.load(tmp_path) is None
    assert IOProfile.for_path(tmp_path).source == "default"
    measured = IOProfile(table={4096: {1: 50.0, 8: 200.0}, 1 << 20: {1: 900.0, 8: 1000.0}},
                         device=disk_profile.device_key(tmp_path))  # fmt: skip
    saved = measured.save()
    assert saved == disk_profile.profile_path() and saved.is_file()
    loaded = IOProfile.load(tmp_path)
    assert loaded is not None and loaded.table == measured.table and loaded.best_threads == 8
    assert FlashReader(profile=loaded).threads == 8


def test_quick_io_bench(disk_dir):
    from rich.console import Console

    from flashllm.disk.probe import format_profile_table, run_io_bench

    calls = []
    profile = run_io_bench(disk_dir, quick=True, seconds_per_cell=0.05, file_bytes=16 << 20,
                           progress=lambda done, total, label: calls.append((done, total)))  # fmt: skip
    assert sorted(profile.table) == [4096, 65536, 1 << 20]
    assert all(sorted(row) == [1, 16, 32] for row in profile.table.values())
    assert all(v > 0 for row in profile.table.values() for v in row.values())
    assert 0 < profile.request_seconds < 0.1 and profile.bytes_per_second > 1e6
    assert profile.best_threads in (1, 16, 32)
    assert calls[-1] == (9, 9)
    assert not [p for p in disk_dir.iterdir() if "iobench" in p.name]  # scratch file deleted
    assert IOProfile.load(disk_dir).table == profile.table  # saved for this device
    console = Console(width=120, record=True, file=open(os.devnull, "w"))
    console.print(format_profile_table(profile))
    text = console.export_text()
    assert "MB/s" in text and "IOPS" in text and "32 threads" in text
