"""The bad-input campaign of tests/test_fuzz.py, long by default (>= 300 cases), one line per case.

    python scripts/fuzz.py [--seed N] [--fast] [--only SUBSTRING] [--keep DIR]

Exit 0 when every case ended as documented (one `error:` line, a success or a usage error; no
traceback, no hang, no read outside the bundle), else 1 with each failure listed. It runs under a memory
cap per case (the address space the process has plus 6 GiB), so that a case allocating without bound
fails with MemoryError instead of taking the machine's memory."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz_inputs import all_cases, build_base  # noqa: E402
from tests.test_fuzz import memory_cap, run_case  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--fast", action="store_true", help="the fast draw of the test suite instead")
    parser.add_argument("--only", default="", help="run only the cases whose name holds this")
    parser.add_argument("--keep", type=Path, help="build the base here (kept) instead of a temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        import os

        os.environ.setdefault("FLASHLLM_HOME", str(Path(tmp) / "home"))
        t0 = time.perf_counter()
        base = build_base(root / "base") if not (root / "base" / "bundle").exists() else _reuse(root / "base")
        cases = [c for c in all_cases(base, args.seed, long=not args.fast) if args.only in c.name]
        print(f"base built in {time.perf_counter() - t0:.1f} s; {len(cases)} cases (seed {args.seed})", flush=True)
        failures = []
        for i, case in enumerate(cases, 1):
            start = time.perf_counter()
            with memory_cap():
                problem = run_case(case, base, root / "cases")
            status = "FAIL" if problem else "ok"
            print(f"{i:4d} {status:4} {time.perf_counter() - start:5.2f}s {case.name}", flush=True)
            if problem:
                print("      " + problem.replace("\n", "\n      "), flush=True)
                failures.append(case.name)
        print(f"{len(cases) - len(failures)} of {len(cases)} cases as documented; {len(failures)} failed")
        return 1 if failures else 0


def _reuse(folder: Path):
    from tests.fuzz_inputs import BASE_META, Base, base_tensors, tokenizer_meta

    meta = BASE_META | tokenizer_meta(folder / "tok")
    return Base(folder, folder / "tiny.gguf", folder / "bundle", meta, base_tensors(), folder / "text.txt",
                folder / "outside")


if __name__ == "__main__":
    sys.exit(main())
