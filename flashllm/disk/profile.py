"""What this disk can do: measured random-read throughput per chunk size and thread count, saved per
device, and the cost model that request planning decides with (docs/DESIGN.md §3)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flashllm.disk.system import MiB
from flashllm.errors import FlashLLMError
from flashllm.paths import home

# docs/DESIGN.md §3: random O_DIRECT reads on the reference machine (ext4 on virtio), MB/s.
DEFAULT_TABLE: dict[int, dict[int, float]] = {
    4096: {1: 54.0, 16: 200.0, 32: 192.0},
    16384: {1: 205.0, 16: 508.0, 32: 538.0},
    65536: {1: 511.0, 16: 890.0, 32: 861.0},
    MiB: {1: 967.0, 16: 984.0, 32: 1003.0},
}



# ---------------------------------------------------------------------------------------------
# I/O profile: what this disk can do, and the cost model coalescing decides with.


def profile_path() -> Path:
    """Where measured I/O profiles are saved (one JSON file, one entry per device)."""
    return home() / "io_profile.json"


def device_key(path: Path | str) -> str:
    """The device ("major:minor") holding `path` (its nearest existing ancestor)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.stat(p)
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


@dataclass
class IOProfile:
    """Measured random-read throughput, {chunk_bytes: {threads: MB/s}}, and the cost model from it.

    The cost of a request of n bytes is modelled as `request_seconds + n / bytes_per_second`
    (docs/DESIGN.md §3: time ~ max(reads / 50k per s, bytes / 1 GB/s) with >= 16 threads).
    """

    table: dict[int, dict[int, float]]
    device: str = ""
    source: str = "measured"  # "measured" or "default"
    direct: bool = True  # measured with O_DIRECT (False: buffered + DONTNEED, e.g. tmpfs)
    measured_at: str = ""
    path: str = ""  # the folder that was measured
    file_bytes: int = 0
    seconds: float = 0.0

    def __post_init__(self):
        # JSON keys are strings; normalise to ints.
        self.table = {int(c): {int(t): float(v) for t, v in row.items()} for c, row in self.table.items()}

    @property
    def chunk_sizes(self) -> list[int]:
        return sorted(self.table)

    @property
    def thread_counts(self) -> list[int]:
        return sorted({t for row in self.table.values() for t in row})

    def iops(self, chunk: int, threads: int) -> float:
        return self.table[chunk][threads] * 1e6 / chunk

    @property
    def request_seconds(self) -> float:
        """Per-request cost: 1 / IOPS for the smallest chunk (4 KiB) at its best thread count."""
        chunk = min(self.table)
        return chunk / (max(self.table[chunk].values()) * 1e6)

    @property
    def bytes_per_second(self) -> float:
        """Bandwidth: the median of the multi-threaded cells with chunks >= 1 MiB (or the largest chunk).

        A median, not a max, because this kind of disk drifts +-30% from minute to minute.
        """
        big = [c for c in self.table if c >= MiB] or [max(self.table)]
        cells = [v for c in big for t, v in self.table[c].items() if t > 1]
        return float(np.median(cells or [v for c in big for v in self.table[c].values()])) * 1e6

    @property
    def merge_gap_bytes(self) -> int:
        """A gap shorter than this is cheaper to read through than to skip with one more request."""
        return int(self.request_seconds * self.bytes_per_second)

    @property
    def best_threads(self) -> int:
        """The thread count with the best throughput relative to each row's best, summed over chunk sizes.

        Ties go to more threads: threads blocked in reads are cheap, an idle device queue is not.
        """

        def score(t: int) -> float:
            return sum(row.get(t, 0.0) / max(row.values()) for row in self.table.values())

        return max(reversed(self.thread_counts), key=score)

    def to_json(self) -> dict:
        d = asdict(self)
        d["table"] = {str(c): {str(t): v for t, v in row.items()} for c, row in self.table.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> IOProfile:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, file: Path | None = None) -> Path:
        """Store this profile under its device key in `file` (default: home()/io_profile.json)."""
        file = file or profile_path()
        data = _read_profiles(file)
        data.setdefault("devices", {})[self.device or "default"] = self.to_json()
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(file)
        return file

    @classmethod
    def load(cls, path: Path | str | None = None, file: Path | None = None) -> IOProfile | None:
        """The saved profile of the device holding `path` (default: the cache folder), or None."""
        devices = _read_profiles(file or profile_path()).get("devices", {})
        entry = devices.get(device_key(path if path is not None else home()))
        return cls.from_json(entry) if entry else None

    @classmethod
    def default(cls) -> IOProfile:
        """docs/DESIGN.md §3's measurements, used where this device has not been benchmarked."""
        return cls(table=DEFAULT_TABLE, source="default")

    @classmethod
    def for_path(cls, path: Path | str) -> IOProfile:
        """The saved profile for the device holding `path`, else the default."""
        return cls.load(path) or cls.default()


def _read_profiles(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise FlashLLMError(f"cannot read I/O profile {file}: {e} (delete it and run `flashllm bench io`)") from e
    return data if isinstance(data, dict) else {}


