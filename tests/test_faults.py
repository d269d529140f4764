"""Faults from outside: kill -9 at many moments of a convert, Ctrl-C during the long commands, a disk that
fills up. Each leaves either nothing or something whole behind, and says so in one line."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flashllm.bundle import writer
from flashllm.bundle.verify import verify
from flashllm.bundle.writer import convert
from flashllm.cli import app
from tests.test_cli_errors import assert_one_line_error
from tests.tiny import tiny_llama, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")  # tmpfs accounts space in pages


# -- helpers ---------------------------------------------------------------------------------------------------

class Capture:
    """A child's pipe read on a thread as it arrives, so the test can watch it (and the child never blocks
    on a full pipe)."""

    def __init__(self, pipe):
        self._data, self._lock = bytearray(), threading.Lock()
        self.thread = threading.Thread(target=self._run, args=(pipe,), daemon=True)
        self.thread.start()

    def _run(self, pipe):
        while chunk := os.read(pipe.fileno(), 1 << 16):
            with self._lock:
                self._data += chunk

    def text(self) -> str:
        with self._lock:
            return self._data.decode(errors="replace")


def start_cli(*args) -> subprocess.Popen:
    """`python -m flashllm ARGS` in its own session (a process group of its own, as a terminal job is), with
    SIGINT's default action as a terminal job has it: a test run started in the background (`cmd &` in a
    script) ignores SIGINT, its children inherit that, and Python then never raises KeyboardInterrupt."""
    return subprocess.Popen([sys.executable, "-m", "flashllm", *map(str, args)], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> set[int]:
    """The processes whose parent is pid (scanning /proc: /proc/PID/task/*/children needs a kernel option)."""
    kids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.add(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may linger where nobody reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs of that size, unmounted after the test; the test is skipped where
    mounting is not permitted (not root, no CAP_SYS_ADMIN, no mount command)."""
    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                  capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"cannot mount a tmpfs for the full-disk test: {e}")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs for the full-disk test (needs root or CAP_SYS_ADMIN): "
                        f"{done.stderr.strip() or done.returncode}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        if subprocess.run(["umount", str(folder)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


# -- 1. kill -9 at ten moments of a convert ---------------------------------------------------------------------

# A process that imports the writer once and forks one convert per request (ten fresh interpreters would
# spend ~40 s importing torch). It runs no torch op before forking, so each child starts torch afresh. The
# writer's phases are slowed down and each child appends "TIME PHASE" lines (CLOCK_MONOTONIC, which the
# test shares) to a marks file, so that the test knows where each kill landed.
FORK_SERVER = textwrap.dedent("""
    import json, os, sys, time, traceback
    import flashllm.bundle.writer as W

    SLOW = json.loads(sys.argv[1])
    marks = None

    def mark(what):
        os.write(marks, f"{time.monotonic():.6f} {what}\\n".encode())

    def slowed(name, before, after):
        original = getattr(W, name)
        def wrapper(*args, **kwargs):
            if before:
                mark(before)
            time.sleep(SLOW[name])
            result = original(*args, **kwargs)
            mark(after(args) if callable(after) else after)
            return result
        setattr(W, name, wrapper)

    slowed("write_layer", None, lambda args: f"wrote {args[0].name}")
    slowed("_manifest", "hashing", "manifest built")
    slowed("_fsync_tree", "manifest written", "fsynced")
    slowed("_install", "renaming", "renamed")

    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                marks = os.open(job["marks"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                mark("started")
                W.convert(job["source"], job["out"], dtype="float32")
                mark("returned")
                time.sleep(job["linger"])  # the rest of the command (its summary line): killed here, if at all
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        print(pid, flush=True)
        print(os.waitpid(pid, 0)[1], flush=True)
""")

SLOW = {"write_layer": 0.05, "_manifest": 0.08, "_fsync_tree": 0.08, "_install": 0.08}
PHASES_AFTER_RENAME = ("renamed", "returned")


@dataclass
class Kill:
    delay: float
    phase: str  # the last mark before the kill
    out: str  # what OUT was afterwards


def test_kill_9_at_ten_moments_of_a_convert(tmp_path):
    """Ten SIGKILLs at seeded moments spread from "the temp folder exists" to past the final rename (the
    timeline measured by one unkilled rehearsal): each leaves no OUT, or a whole OUT that verify accepts;
    each next convert removes the previous one's temporary folder; a final convert succeeds and verifies."""
    source = tiny_llama(tmp_path / "src", num_hidden_layers=8)
    disk = tmp_path / "disk"  # OUT's parent: only OUT and convert's temporaries ever appear here
    disk.mkdir()
    out = disk / "bundle"
    marks = tmp_path / "marks"
    marks.mkdir()
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER, json.dumps(SLOW)], cwd=REPO, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(name: str, delay: float | None) -> tuple[int, int, float, float]:
        """One convert; SIGKILL it `delay` s after its temp folder appears (None: let it finish). Returns
        its pid, wait status, when its temp folder was seen, and when it was killed."""
        job = {"source": str(source), "out": str(out), "marks": str(marks / name), "linger": 0 if delay is None else 30}
        server.stdin.write(json.dumps(job) + "\n")
        server.stdin.flush()
        pid = int(server.stdout.readline())
        tmp, deadline = disk / f".bundle.tmp-{pid}", time.monotonic() + 60
        while not tmp.exists():
            assert time.monotonic() < deadline and not out.exists(), "the convert never created its temp folder"
            time.sleep(0.005)
        seen = time.monotonic()
        # it cleared the temporaries of earlier killed runs before making its own
        assert sorted(p.name for p in disk.iterdir()) == [tmp.name], sorted(p.name for p in disk.iterdir())
        killed = 0.0
        if delay is not None:
            time.sleep(max(0.0, seen + delay - time.monotonic()))
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
        return pid, int(server.stdout.readline()), seen, killed

    def read_marks(name: str) -> list[tuple[float, str]]:
        lines = (marks / name).read_text().splitlines()
        return [(float(t), what) for t, what in (line.split(" ", 1) for line in lines)]

    kills: list[Kill] = []
    try:
        # the rehearsal: how long the slowed convert takes, from its temp folder to its rename
        pid, status, seen, _ = run("rehearsal", None)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        timeline = {what: t for t, what in read_marks("rehearsal")}
        until_rename = timeline["renamed"] - seen
        assert verify(out) == []
        shutil.rmtree(out)
        # one seeded moment in each tenth of [0, 1.15 x until_rename]: the last tenth is partly past the rename
        rng = random.Random(20240611)
        delays = [(i + rng.random()) / 10 * until_rename * 1.15 for i in range(10)]
        for i, delay in enumerate(delays):
            name = f"kill{i}"
            pid, status, seen, killed = run(name, delay)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
                f"kill {i} at {delay:.3f} s: the convert was not killed by the signal (status {status})"
            phase = next((what for t, what in reversed(read_marks(name)) if t <= killed), "started")
            left = sorted(p.name for p in disk.iterdir())
            if out.exists():  # killed after the rename: a whole bundle, and no temporary beside it
                assert phase in ("renaming", *PHASES_AFTER_RENAME), (i, phase)
                assert verify(out) == [], (i, phase)
                assert left == ["bundle"], (i, phase, left)
                kills.append(Kill(delay, phase, "complete, verified"))
                shutil.rmtree(out)  # so that the next convert may write it again
            else:
                assert phase not in PHASES_AFTER_RENAME, (i, phase)
                assert left in ([], [f".bundle.tmp-{pid}"]), (i, phase, left)  # at most its own leftover
                kills.append(Kill(delay, phase, "absent"))
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    print(f"\nslowed convert: temp folder -> renamed in {until_rename:.3f} s (rehearsal)")
    for i, k in enumerate(kills):
        print(f"kill {i}: {k.delay:.3f} s after the temp folder, last phase {k.phase!r}: OUT {k.out}")
    # the moments spread over the write: before the layers are all written, and in the final phase
    phases = [k.phase for k in kills]
    assert any(p == "started" or (p.startswith("wrote layer_") and p != "wrote layer_007.bin") for p in phases), phases
    assert any(p in ("wrote layer_007.bin", "hashing", "manifest built", "manifest written", "fsynced", "renaming",
                     *PHASES_AFTER_RENAME) for p in phases), phases
    assert len(set(phases)) >= 4, phases
    # a later run is not tripped up by the last leftover, and removes it
    convert(source, out, dtype="float32")
    assert verify(out) == []
    assert sorted(p.name for p in disk.iterdir()) == ["bundle"]


# -- 2. Ctrl-C during the long commands -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A float32 bundle with a tokenizer and no end-of-sequence token (generation never stops early) and a
    long context (4096 positions)."""
    root = tmp_path_factory.mktemp("faults")
    source = tiny_llama(root / "src", vocab_size=300, num_hidden_layers=4, max_position_embeddings=4096,
                        bos_token_id=None, eos_token_id=None)
    tiny_tokenizer(source, 300)
    (source / "tokenizer_config.json").write_text("{}")  # no <eos>
    out = root / "bundle"
    convert(source, out, dtype="float32")
    return out


@dataclass
class Interrupted:
    code: int
    before: str  # stderr when the signal was sent
    stderr: str
    stdout: str


def interrupt(args, ready, group: bool = False, timeout: float = 120) -> Interrupted:
    """Start `python -m flashllm ARGS`, wait until ready(proc, stdout, stderr) says the work is under way,
    send SIGINT (to its process group with group=True, as a terminal's Ctrl-C does), and wait for it."""
    proc = start_cli(*args)
    out, err = Capture(proc.stdout), Capture(proc.stderr)
    try:
        deadline = time.monotonic() + timeout
        while not ready(proc, out, err):
            assert proc.poll() is None, f"exited {proc.returncode} before the interrupt:\n{err.text()[-2000:]}"
            assert time.monotonic() < deadline, f"not under way after {timeout} s:\n{err.text()[-2000:]}"
            time.sleep(0.05)
        assert proc.poll() is None, f"finished before the interrupt:\n{err.text()[-2000:]}"
        before = err.text()
        (os.killpg if group else os.kill)(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 60 s after SIGINT:\n{err.text()[-2000:]}")
    finally:
        stop(proc)
    out.thread.join(10)
    err.thread.join(10)
    return Interrupted(code, before, err.text(), out.text())


def assert_interrupted(r: Interrupted) -> None:
    """Exit 130, and the interrupt adds a single line to stderr: no traceback, no other noise."""
    assert r.code == 130, (r.code, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.startswith(r.before)
    added = r.stderr[len(r.before):].strip().splitlines()
    assert len(added) == 1 and "interrupted" in added[0], r.stderr


def test_ctrl_c_during_generate(tiny_bundle):
    """Budgeted generation of 4000 tokens, interrupted once tokens are streaming to stdout."""
    def ready(proc, out, err):
        if not out.text():
            return False
        time.sleep(0.3)  # a few more tokens
        return True

    r = interrupt(["generate", tiny_bundle, "The assignment", "-b", "64MB", "-n", "4000", "--mode", "dense",
                   "--stats", "none"], ready)
    assert_interrupted(r)
    assert r.before == "" and r.stderr.strip() == "interrupted", r.stderr
    assert r.stdout  # the tokens generated so far stay printed


def test_ctrl_c_during_train_predictor(tiny_bundle):
    """train-predictor interrupted one CPU second into its work, past its imports (their CPU time measured
    here; CPU time, not wall time, so a loaded machine does not move the moment back into the start-up).
    The bundle stays intact and gets no predictors."""
    import resource

    spent = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", "import flashllm.cli, flashllm.sparsity.train"], cwd=REPO, check=True,
                   timeout=300)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    startup_cpu = (used.ru_utime - spent.ru_utime) + (used.ru_stime - spent.ru_stime)
    files = sorted(p.relative_to(tiny_bundle) for p in tiny_bundle.rglob("*"))

    def ready(proc, out, err):
        return cpu_seconds(proc.pid) >= startup_cpu + 1.0

    r = interrupt(["train-predictor", tiny_bundle, "--tokens", "200000", "--eval-tokens", "0", "--sparsity", "0.5"], ready)
    assert_interrupted(r)
    assert r.before == "" and r.stderr.strip() == "interrupted", r.stderr
    assert verify(tiny_bundle) == []
    assert sorted(p.relative_to(tiny_bundle) for p in tiny_bundle.rglob("*")) == files  # no predictors, no leftovers
    assert sorted(p.name for p in tiny_bundle.parent.iterdir()) == ["bundle", "src"]


def test_ctrl_c_during_bench_quick(tiny_bundle):
    """bench --quick with its strategy workers running, Ctrl-C to the whole process group as a terminal sends
    it: exit 130, one line, and no worker process outlives it."""
    workers: set[int] = set()

    def ready(proc, out, err):
        if "starting workers" not in err.text():
            return False
        workers.update(children(proc.pid))
        if len(workers) < 2:  # the resident model's worker said hello and the naive one is starting
            return False
        time.sleep(0.3)
        return True

    r = interrupt(["bench", tiny_bundle, "--quick", "--strategies", "naive", "-b", "64MB"], ready, group=True)
    assert_interrupted(r)
    assert r.before.strip() == "starting workers", r.before
    deadline = time.monotonic() + 20
    while any(running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(running(pid) for pid in workers), "a bench worker outlived the interrupted bench"


# -- 3. a full disk -------------------------------------------------------------------------------------------

def test_convert_onto_a_disk_too_small_is_refused_up_front(tmp_path, small_disk):
    """A 2 MB tmpfs and a ~5 MB bundle: convert's space check refuses before writing anything."""
    source = tiny_llama(tmp_path / "src", hidden_size=128, intermediate_size=512, num_hidden_layers=8)
    disk = small_disk("2m")
    done = subprocess.run([sys.executable, "-m", "flashllm", "convert", source, disk / "bundle"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and "not enough free disk" in lines[0], done.stderr
    sizes = [float(n.replace(",", "")) for n in re.findall(r"([\d.,]+) [KMG]i?B", lines[0])]
    assert len(sizes) >= 2 and all(sizes), lines[0]  # what it needs and what is free, not "0.00 GB"
    assert list(disk.iterdir()) == []


def test_disk_filling_up_during_convert(tmp_path, small_disk):
    """The space check passes, then (as another writer would) the disk is filled to the last byte as soon
    as convert's temp folder appears: the CLI exits 1 with one error line naming the full disk, and
    removes everything it wrote."""
    source = tiny_llama(tmp_path / "src", vocab_size=1000, hidden_size=256, intermediate_size=1024,
                        num_hidden_layers=8)  # ~34 MB in float32
    bundle_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    disk = small_disk(f"{int(bundle_bytes * 1.02 / 2**20) + 64 + 8}m")  # what the check asks for, and a bit
    proc = start_cli("convert", source, disk / "bundle", "--dtype", "float32")
    err = Capture(proc.stderr)
    filler = disk / "filler"
    try:
        deadline = time.monotonic() + 120
        while not list(disk.glob(".bundle.tmp-*")):
            assert proc.poll() is None, f"convert ended before writing:\n{err.text()}"
            assert time.monotonic() < deadline, "convert never created its temp folder"
            time.sleep(0.005)
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, bytes(1 << 20))
        except OSError as e:
            assert e.errno == 28, e
        finally:
            os.close(fd)
        assert not (disk / "bundle").exists(), "convert finished before the disk was full"
        code = proc.wait(timeout=120)
    finally:
        stop(proc)
    err.thread.join(10)
    lines = err.text().strip().splitlines()
    assert code == 1, err.text()
    assert len(lines) == 1 and lines[0].startswith("error:") and "No space left on device" in lines[0], err.text()
    filler.unlink()
    assert list(disk.iterdir()) == []


def test_disk_full_while_saving_the_tokenizer(tmp_path, small_disk, monkeypatch):
    """The disk has room for the weights but not for tokenizer.json (the tokenizers library reports a failed
    write as a bare Exception, not an OSError): still one error line, and nothing left behind."""
    from tokenizers import Tokenizer as Backend

    from flashllm.tokenizer import Tokenizer

    source = tiny_llama(tmp_path / "src", vocab_size=1300)
    tiny_tokenizer(source, 300)
    backend = Backend.from_file(str(source / "tokenizer.json"))
    backend.add_tokens([f"word{i}" for i in range(1000)])  # tokenizer.json ~100 KB, tens of pages
    backend.save(str(source / "tokenizer.json"))
    dry = tmp_path / "dry"
    convert(source, dry)
    weight_pages = sum(-(-p.stat().st_size // PAGE) for p in [dry / "resident.safetensors", *dry.glob("ffn/*")])
    tokenizer_pages = -(-(dry / "tokenizer.json").stat().st_size // PAGE)
    assert tokenizer_pages >= 16
    disk = small_disk("8m")
    room = (weight_pages + tokenizer_pages // 2) * PAGE  # the weights fit, half the tokenizer does
    with open(disk / "filler", "wb") as f:
        f.write(bytes(free_bytes(disk) - room))
    assert free_bytes(disk) == room
    # the up-front check sees a roomy disk (the space goes between the check and the writes)
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))
    failed = []
    save = Tokenizer.save

    def spy(self, folder):
        try:
            return save(self, folder)
        except BaseException as e:
            failed.append(e)
            raise

    monkeypatch.setattr(Tokenizer, "save", spy)
    result = CliRunner().invoke(app, ["convert", str(source), str(disk / "bundle")])
    assert failed, "the disk filled up before the tokenizer was saved; the test missed its target"
    assert_one_line_error(result, "No space left on device")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]
