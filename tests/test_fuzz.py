"""Bad input, generated: a seeded fuzz campaign through the CLI (cases in tests/fuzz_inputs.py).

Every case must end in the documented outcome: exit 1 with one `error:` line (holding the case's
fragments), a success, or click's usage error; never a traceback, never a hang (a timer per case),
never an open of a file outside the bundle (an audit hook sees every open the process makes; the
outside folder holds valid copies of a layer, the resident file and the tokenizer, so following a
path there would succeed). The fast run (this file, ~80 cases) takes seconds after the base is built;
FLASHLLM_FUZZ_LONG=1 or scripts/fuzz.py runs the long campaign (>= 300 cases); FLASHLLM_FUZZ_SEED
picks another draw."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flashllm.cli import app
from tests.fuzz_inputs import Base, Case, all_cases, build_base, edit_manifest, named_cases, _set

LONG = os.environ.get("FLASHLLM_FUZZ_LONG") == "1"
SEED = int(os.environ.get("FLASHLLM_FUZZ_SEED", "14"))
runner = CliRunner()
_watched: list[str] = []  # folders no case may open a file in
_opened: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _watched and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if any(path.startswith(folder) for folder in _watched):
            _opened.append(path)


sys.addaudithook(_audit)  # audit hooks cannot be removed: it does nothing while _watched is empty


class CaseTimeout(BaseException):
    """Raised by the timer in the case's own thread; a BaseException, so no `except Exception` hides it."""


def _alarm(signum, frame):
    raise CaseTimeout()


def run_case(case: Case, base: Base, work: Path) -> str | None:
    """Run one case on fresh copies of the base; None when it ends as it must, else what went wrong."""
    case_dir = work / re.sub(r"[^A-Za-z0-9_.-]+", "_", case.name)[:120]
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    shutil.copytree(base.bundle, case_dir / "bundle", symlinks=True)
    shutil.copy(base.gguf, case_dir / "tiny.gguf")
    if case.setup is not None:
        case.setup(case_dir, base)
    names = {"bundle": case_dir / "bundle", "gguf": case_dir / "tiny.gguf", "text": base.text,
             "out": case_dir / "out", "outside": base.outside}
    args = [re.sub(r"\{(\w+)\}", lambda m: str(names[m.group(1)]), a) for a in case.args]
    _opened.clear()
    _watched[:] = [str(base.outside.resolve()), str(base.outside)]
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, case.timeout)
    start = time.perf_counter()
    try:
        result = runner.invoke(app, args)
    except CaseTimeout:
        return f"hang: no answer in {case.timeout:.0f} s"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _watched.clear()
    seconds = time.perf_counter() - start
    return judge(case, result.exit_code, result.stdout, result.stderr, result.exception, seconds)


def judge(case: Case, code: int, stdout: str, stderr: str, exception, seconds: float = 0.0) -> str | None:
    said = f"exit {code}; stderr: {stderr.strip()[-600:]!r}"
    if exception is not None and not isinstance(exception, SystemExit):
        import traceback

        where = "".join(traceback.format_exception(exception)[-3:])
        return f"traceback: {type(exception).__name__}: {exception}\n{where}"
    if "Traceback" in stdout + stderr:
        return f"traceback in the output; {said}"
    if _opened:
        return f"opened a file outside the bundle: {_opened[0]}"
    lines = stderr.strip().splitlines()
    one_error = code == 1 and len(lines) == 1 and lines[0].startswith("error:")
    if case.expect == "usage":
        ok = code == 2 and all(f in stderr for f in case.fragments)
        return None if ok else f"expected a usage error naming {case.fragments}; {said}"
    if case.expect == "ok":
        ok = code == 0 and all(f in stdout + stderr for f in case.fragments)
        return None if ok else f"expected success; {said}"
    if case.expect == "error" and not one_error:
        return f"expected one `error:` line and exit 1; {said}"
    if code != 0 and not one_error:
        return f"a failure must be one `error:` line with exit 1; {said}"
    missing = [f for f in case.fragments if f not in stderr]
    if code != 0 and missing:
        return f"the error does not say {missing}; {said}"
    return None


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    return build_base(tmp_path_factory.mktemp("fuzz") / "base")


@contextlib.contextmanager
def memory_cap(extra: int = 6 << 30):
    """Address space capped at what the process has plus `extra`: a case that allocates without bound
    fails with MemoryError (reported as a traceback) instead of taking the machine's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    cap = size + extra if hard == resource.RLIM_INFINITY else min(size + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_all(cases: list[Case], base: Base, work: Path) -> tuple[list[str], dict]:
    failures, counts = [], {"cases": 0}
    with memory_cap():
        for case in cases:
            problem = run_case(case, base, work)
            counts["cases"] += 1
            if problem:
                failures.append(f"{case.name}: {problem}")
            shutil.rmtree(work / re.sub(r"[^A-Za-z0-9_.-]+", "_", case.name)[:120], ignore_errors=True)
    return failures, counts


def test_fuzz_campaign(base, tmp_path):
    """The named cases (the issue's list), a seeded draw of every manifest and predictors.json key
    missing / mistyped / out of range, and random byte flips: none may traceback, hang or read outside."""
    cases = all_cases(base, SEED, LONG)
    failures, counts = run_all(cases, base, tmp_path)
    print(f"fuzz: {counts['cases']} cases (seed {SEED}, {'long' if LONG else 'fast'} run)")
    assert not failures, f"{len(failures)} of {counts['cases']} cases failed:\n" + "\n".join(failures)


def test_named_cases_cover_the_issue():
    names = {c.name.split(":")[1] for c in named_cases()}
    for needed in ("no-ffn", "dtype-int8", "layers-huge", "vocab-100", "kv-heads-3", "stride-0", "layer-dotdot",
                   "group-0", "foreign-n-ff", "head-count-0", "context-0", "rope-inf", "eps-nan", "flip-version",
                   "prompt-not-utf8", "policy-bogus-dense", "version"):
        assert needed in names, needed
    assert len(named_cases()) >= 60


def test_huge_layer_count_answers_in_a_subprocess(base, tmp_path):
    """The hang the issue found, through the installed entry point: a manifest claiming 10^12 layers
    answers in one line at once (a subprocess, so that a hang inside C code would be caught too)."""
    edit_manifest(_set("config.num_hidden_layers", 10 ** 12))(tmp_path, _copy(base, tmp_path))
    out = subprocess.run([sys.executable, "-m", "flashllm", "info", str(tmp_path / "bundle")], capture_output=True,
                         text=True, timeout=120)
    case = Case("subprocess", [], expect="error", fragments=("num_hidden_layers",))
    assert judge(case, out.returncode, out.stdout, out.stderr, None) is None, out.stderr


def _copy(base: Base, folder: Path) -> Base:
    shutil.copytree(base.bundle, folder / "bundle", symlinks=True)
    return base
