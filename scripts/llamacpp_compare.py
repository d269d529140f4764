"""The peer comparison: llama.cpp (mmap, page cache) vs flashllm on Qwen2.5-Coder-1.5B, both held by the
kernel to the same kind of memory cgroup cap. Two modes: fp16 (the default) and --gguf-direct (the
quantized Q4_K_M file itself).

    python scripts/llamacpp_compare.py [--tokens 32] [--prompt TEXT] [--budget-percent 50]
                                       [--bundle PATH] [--skip-build] [--threads 2]
    python scripts/llamacpp_compare.py --gguf-direct [--caps 50,75,full] [--rounds 2] [--gguf PATH]
                                       [--flashllm-bundle PATH --flashllm-args "..."]

Steps (idempotent; everything built lives under $FLASHLLM_HOME/llamacpp, default ~/.cache/flashllm/llamacpp):
1. llama.cpp from the llama-cpp-python sdist on PyPI (it vendors upstream llama.cpp), cmake + ninja,
   Release, GGML_NATIVE, CPU only; targets llama-completion (or llama-cli) and llama-quantize.
2. An F16 GGUF made from the pulled Q4_K_M file with `llama-quantize --allow-requantize IN OUT F16`.
3. Runs, same prompt, same token count, greedy, same threads:
   a) llama.cpp F16, no cap;
   b) llama.cpp F16 in a memory cgroup of budget-percent of the F16 file + 300 MiB, file dropped from
      the page cache first;
   c) flashllm with --dram-budget = budget-percent of the same F16 file, in a cgroup of that budget + its
      own measured fixed overhead (a free run first reads overhead_bytes, as scripts/budget_check.py does).

llama.cpp's bytes read are the kernel's count for the process (read_bytes in /proc/PID/io, which counts
what reached the block device, mmap page faults included). The script samples it while llama.cpp runs,
notes the value when the first generated token reaches stdout (prompt echo off), and reads the final
value from the zombie before reaping it (waitid WNOWAIT). Decode bytes per token = (final - at first
token) / eval runs reported by llama.cpp. flashllm's numbers come from its --stats json line.

--gguf-direct (alias --quantized): no F16 conversion; llama.cpp runs on the pulled Q4_K_M GGUF (1.12 GB)
at each cap of --caps, percentages of the GGUF file size: a memory cgroup of pct% of the file + 300 MiB,
the file dropped from the page cache before every run; `full` = no cap (still run in a cgroup, limited
to the machine's RAM, only to read its peak). 2 threads, greedy, same prompt and token count. Reported
per run: decode tokens/s, bytes read per decode token (read_bytes, as above) and the cgroup's peak.
llama.cpp runs with --no-repack here: its CPU backend otherwise repacks Q4 weights into interleaved
copies at load, and on the project's VMs whose CPU advertises AMX (the VM faults on it) that crashes
at warm-up. (On an AVX2-only AMD EPYC VM repacking ran without a crash.) The flag stays on everywhere:
repacking also moves the weights out of the mmap'd file into anonymous memory, which is not the
page-cache peer this compares against. --allow-repack drops the flag.
With --flashllm-bundle PATH, every llama.cpp run is followed (odd rounds; preceded on even rounds, so
drift hits both) by `python -m flashllm generate PATH PROMPT --dram-budget B -n TOKENS --stats json
[--flashllm-args ...]` under the same cgroup cap, B = the cap - flashllm's fixed overhead (measured
once by an uncapped 1-token run, the overhead_bytes of its stats line); at `full`, --dram-budget 100%
and no cap. The bundle's files are dropped from the page cache before each of its runs too. Ends with
a table of both, side by side, per cap and round, and the median ratio per cap.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from flashllm.measure.cgroup import cgroup_peak, cgroup_unavailable_reason, drop_file_cache, memory_cgroup, oom_killed
from flashllm.hub import resolve
from flashllm.paths import home

MODEL = "qwen2.5-coder-1.5b"
MiB = 1 << 20


def say(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- build


def workdir() -> Path:
    return home() / "llamacpp"


def built_binaries(build: Path) -> tuple[Path, Path] | None:
    bins = build / "bin"
    quantize = bins / "llama-quantize"
    for name in ("llama-completion", "llama-cli"):
        if (bins / name).exists() and quantize.exists():
            return bins / name, quantize
    return None


def ensure_tools() -> None:
    missing = [tool for tool in ("cmake", "ninja") if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(f"missing {', '.join(missing)}: install cmake and ninja-build")
    say("installing cmake ninja-build with apt-get")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "cmake", "ninja-build"], check=True)


def fetch_source(root: Path) -> Path:
    """Download (once) and unpack (once) the llama-cpp-python sdist; its vendored llama.cpp folder."""
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    sdists = sorted(downloads.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        say("pip download --no-binary :all: llama-cpp-python (sdist)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "--quiet", "-d", str(downloads), "llama-cpp-python"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        sdists = sorted(downloads.glob("llama_cpp_python-*.tar.gz"))
        if result.returncode != 0 or not sdists:
            raise SystemExit(f"pip download llama-cpp-python failed: {result.stderr.strip()[-500:]}")
    sdist = sdists[-1]
    name = sdist.name[: -len(".tar.gz")]
    src = root / "src" / name
    vendor = src / "vendor" / "llama.cpp"
    if not (vendor / "CMakeLists.txt").exists():
        say(f"unpacking {sdist.name}")
        (root / "src").mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tar:
            tar.extractall(root / "src", filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(root / "src")
    if not (vendor / "CMakeLists.txt").exists():
        raise SystemExit(f"{sdist.name} has no vendor/llama.cpp")
    return vendor


def build_llamacpp(skip: bool) -> tuple[Path, Path, float | None]:
    """(completion binary, quantize binary, build seconds or None if cached)."""
    root = workdir()
    build = root / "build"
    found = built_binaries(build)
    if found:
        return (*found, None)
    if skip:
        raise SystemExit(f"--skip-build but no llama.cpp build in {build}")
    ensure_tools()
    vendor = fetch_source(root)
    start = time.perf_counter()
    configure = ["cmake", "-S", str(vendor), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                 "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                 "-DBUILD_SHARED_LIBS=OFF", "-Wno-dev"]
    say("configuring llama.cpp: " + " ".join(configure[5:]))
    result = subprocess.run(configure, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"cmake configure failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    targets = subprocess.run(["cmake", "--build", str(build), "--target", "help"], capture_output=True, text=True).stdout
    main = "llama-completion" if re.search(r"^llama-completion\b", targets, re.M) else "llama-cli"
    say(f"building {main} and llama-quantize (several minutes on 2 cores)")
    result = subprocess.run(["cmake", "--build", str(build), "--target", main, "llama-quantize", "-j", str(os.cpu_count() or 2)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"build failed:\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}")
    found = built_binaries(build)
    if not found:
        raise SystemExit(f"build finished but no binaries in {build / 'bin'}")
    seconds = time.perf_counter() - start
    (root / "build_seconds.txt").write_text(f"{seconds:.0f}\n")
    return (*found, seconds)


def make_f16(quantize: Path) -> Path:
    source = resolve(MODEL, progress=say)
    out = workdir() / "qwen2.5-coder-1.5b-f16.gguf"
    if out.exists():
        return out
    say(f"llama-quantize --allow-requantize {source.name} -> {out.name} F16")
    partial = out.with_name(out.name + ".partial")
    result = subprocess.run([str(quantize), "--allow-requantize", str(source), str(partial), "F16"],
                            capture_output=True, text=True)
    if result.returncode != 0 or not partial.exists():
        raise SystemExit(f"llama-quantize failed:\n{result.stderr[-2000:]}")
    os.replace(partial, out)
    return out


# ---------------------------------------------------------------- measuring a process


def read_bytes_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Watched:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    read_bytes: int | None  # whole run
    read_bytes_at_first_output: int | None
    peak_bytes: int | None = None  # cgroup peak, capped runs only
    oom: bool = False
    samples: list = field(default_factory=list)


def watch(cmd: list[str], limit_bytes: int | None, timeout: float) -> Watched:
    """Run cmd (in a fresh memory cgroup when limit_bytes is set); sample its /proc/PID/io; note the
    count when stdout first receives a byte, and the final count from the zombie before reaping."""
    if limit_bytes is None:
        return _watch(cmd, None, timeout)
    with memory_cgroup(limit_bytes) as (enter, group):
        w = _watch(cmd, enter, timeout)
        w.peak_bytes = cgroup_peak(group)
        w.oom = oom_killed(group) or w.returncode in (-9, 137)
        return w


def _watch(cmd, preexec, timeout) -> Watched:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec)
    out, err = bytearray(), bytearray()
    first = {}
    samples = []

    def pump(stream, sink, note_first):
        while chunk := stream.read1(65536):
            if note_first and not first:
                first["bytes"] = read_bytes_of(proc.pid)
                first["t"] = time.perf_counter() - start
            sink.extend(chunk)

    threads = [threading.Thread(target=pump, args=(proc.stdout, out, True), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err, False), daemon=True)]
    for t in threads:
        t.start()
    done = threading.Event()

    def sample():
        while not done.is_set():
            value = read_bytes_of(proc.pid)
            if value is not None:
                samples.append((time.perf_counter() - start, value))
            done.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    deadline = start + timeout
    final = None
    while True:  # wait for exit without reaping, so /proc/PID/io of the zombie can still be read
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        if info is not None:
            final = read_bytes_of(proc.pid)
            break
        if time.perf_counter() > deadline:
            proc.kill()
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            break
        time.sleep(0.05)
    done.set()
    code = proc.wait()
    seconds = time.perf_counter() - start
    for t in threads:
        t.join(timeout=5)
    sampler.join(timeout=5)
    if final is None and samples:
        final = samples[-1][1]
    return Watched(code, out.decode(errors="replace"), err.decode(errors="replace"), seconds, final,
                   first.get("bytes"), samples=samples)


# ---------------------------------------------------------------- llama.cpp


@dataclass
class Result:
    engine: str
    cap_bytes: int | None
    ok: bool
    tokens_per_s: float | None = None
    bytes_per_token: float | None = None
    tokens: int | None = None
    note: str = ""
    peak_bytes: int | None = None  # the cgroup's peak
    budget_bytes: int | None = None  # flashllm's --dram-budget
    round: int = 1
    label: str = ""  # the cap as asked for: "50%", "full"


def parse_llama_timings(stderr: str) -> dict:
    """tokens/s and runs of llama.cpp's decode ("eval time") line."""
    found = {}
    for line in stderr.splitlines():
        m = re.search(r"(prompt eval|eval) time\s*=\s*([\d.]+) ms\s*/\s*(\d+) (?:runs|tokens).*?([\d.]+) tokens per second",
                      line)
        if m:
            key = "prefill" if m.group(1) == "prompt eval" else "decode"
            found[key] = {"ms": float(m.group(2)), "runs": int(m.group(3)), "tokens_per_s": float(m.group(4))}
        m = re.search(r"load time\s*=\s*([\d.]+) ms", line)
        if m:
            found["load_ms"] = float(m.group(1))
    return found


def llama_cmd(binary: Path, model: Path, prompt: str, tokens: int, threads: int,
              extra: tuple[str, ...] = ()) -> list[str]:
    # A small context and batch: llama.cpp would otherwise size its KV cache for 32k tokens (~0.9 GB)
    # and its compute buffer for 512-token batches, memory that would crowd out its page cache under the cap.
    cmd = [str(binary), "-m", str(model), "-p", prompt, "-n", str(tokens), "-t", str(threads), "-tb", str(threads),
           "-c", "512", "-b", "64", "-ub", "64", "--temp", "0", "--seed", "0", "--ignore-eos",
           "--no-display-prompt", *extra]
    if binary.name == "llama-completion" or _has_option(binary, "-no-cnv"):
        cmd.append("-no-cnv")
    return cmd


def _has_option(binary: Path, option: str) -> bool:
    result = subprocess.run([str(binary), "--help"], capture_output=True, text=True)
    return option in result.stdout + result.stderr


def warm_file(path: Path) -> None:
    """Read a file once so that it sits in the page cache (the unconstrained, in-RAM run)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass


def run_llama(binary: Path, model: Path, args, cap: int | None, name: str = "llama.cpp F16 (mmap)",
              extra: tuple[str, ...] = (), warm: bool | None = None, cgroup_limit: int | None = None) -> Result:
    """One llama.cpp run. cap: the memory cgroup limit (None: none). warm: read the file into the page
    cache first (default: when uncapped) or drop it. cgroup_limit: run in a cgroup of this limit even
    when cap is None (to read the peak of an uncapped run)."""
    cmd = llama_cmd(binary, model, args.prompt, args.tokens, args.threads, extra)
    if warm if warm is not None else cap is None:
        warm_file(model)
    else:
        drop_file_cache(model)
    w = watch(cmd, cap if cap is not None else cgroup_limit, args.timeout)
    if w.returncode != 0:
        why = "OOM-killed" if w.oom else f"exit {w.returncode}"
        return Result(name, cap, False, note=f"{why}: {w.stderr.strip()[-300:]}", peak_bytes=w.peak_bytes)
    t = parse_llama_timings(w.stderr)
    decode = t.get("decode")
    if not decode:
        return Result(name, cap, False, note="no eval timing line in llama.cpp's output")
    per_token = None
    note = f"load {t.get('load_ms', 0) / 1e3:.1f} s, {decode['runs']} eval runs; read {(w.read_bytes or 0) / 1e6:.0f} MB in all"
    if w.read_bytes is not None and w.read_bytes_at_first_output is not None and decode["runs"]:
        per_token = (w.read_bytes - w.read_bytes_at_first_output) / decode["runs"]
    if w.peak_bytes:
        note += f"; cgroup peak {w.peak_bytes / 1e6:.0f} MB"
    if args.verbose:
        say(f"--- {name}, cap {cap}: stdout\n{w.stdout.strip()}\n--- stderr tail\n{w.stderr.strip()[-1500:]}")
    return Result(name, cap, True, decode["tokens_per_s"], per_token, decode["runs"] + 1, note, w.peak_bytes)


# ---------------------------------------------------------------- flashllm


def default_bundle() -> Path:
    return home() / "bundles" / MODEL


def run_flashllm(bundle: Path, budget: int, args, gate_up: str = "flash") -> tuple[Result, Result | None]:
    cmd = [sys.executable, "-m", "flashllm", "generate", str(bundle), args.prompt, "--dram-budget", str(budget),
           "-n", str(args.tokens), "--stats", "json", "--gate-up", gate_up]
    name = "flashllm" if gate_up == "flash" else "flashllm int4 gate/up"
    free = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if free.returncode != 0:
        return Result(name, None, False, note=free.stderr.strip()[-300:]), None
    s = json.loads(free.stderr.strip().splitlines()[-1])
    free_result = Result(name, None, True, s["tokens_per_s"], s["bytes_read_per_token"], s["tokens"],
                         f"mode {s['mode']}, budget only (no cgroup); overhead {s['overhead_bytes'] / 1e6:.0f} MB")
    limit = s["budget_bytes"] + s["overhead_bytes"]
    for path in bundle.rglob("*"):
        if path.is_file():
            drop_file_cache(path)
    w = watch(cmd, limit, args.timeout)
    if w.returncode != 0:
        why = "OOM-killed" if w.oom else f"exit {w.returncode}"
        return free_result, Result(name, limit, False, note=f"{why}: {w.stderr.strip()[-300:]}")
    c = json.loads(w.stderr.strip().splitlines()[-1])
    note = (f"mode {c['mode']}, policy {c['policy']}, cache {100 * c['cache_share']:.0f}% of FFN, "
            f"budget {c['budget_bytes'] / 1e6:.0f} MB + overhead {c['overhead_bytes'] / 1e6:.0f} MB, "
            f"peak RSS {c['peak_rss_bytes'] / 1e6:.0f} MB, cgroup peak {(w.peak_bytes or 0) / 1e6:.0f} MB, "
            f"kernel read {(c['kernel_bytes_read'] or 0) / max(c['tokens'], 1) / 1e6:.0f} MB/token")
    if args.verbose:
        say(f"--- flashllm capped: stdout\n{w.stdout.strip()}")
    return free_result, Result(name, limit, True, c["tokens_per_s"], c["bytes_read_per_token"], c["tokens"], note)


# ---------------------------------------------------------------- --gguf-direct: the quantized file itself


def stats_line(stderr: str) -> dict | None:
    """The last JSON object line of a `--stats json` stderr."""
    for line in reversed(stderr.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def parse_caps(text: str) -> list[float | None]:
    """"50,75,full" -> [50.0, 75.0, None]; None = no cap."""
    caps = []
    for part in text.split(","):
        part = part.strip().rstrip("%").lower()
        if part in ("full", "none", "nocap", "100+"):
            caps.append(None)
            continue
        try:
            value = float(part)
        except ValueError:
            raise SystemExit(f"--caps: {part!r} is neither a percentage nor 'full'")
        if value <= 0:
            raise SystemExit(f"--caps: {value:g}% is not a cap")
        caps.append(value)
    if not caps:
        raise SystemExit("--caps: no caps")
    return caps


def cap_label(pct: float | None) -> str:
    return "full" if pct is None else f"{pct:g}%"


def machine_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def drop_bundle_cache(bundle: Path) -> None:
    for path in [bundle] if bundle.is_file() else bundle.rglob("*"):
        if path.is_file():
            drop_file_cache(path)


def flashllm_cmd(bundle: Path, args, budget: str, tokens: int | None = None) -> list[str]:
    return [sys.executable, "-m", "flashllm", "generate", str(bundle), args.prompt, "--dram-budget", budget,
            "-n", str(tokens or args.tokens), "--stats", "json", *shlex.split(args.flashllm_args or "")]


def flashllm_overhead(bundle: Path, args) -> tuple[int | None, str]:
    """flashllm's fixed overhead (RSS before any weight: Python, torch, libraries), from an uncapped
    1-token run; (bytes or None, why not)."""
    cmd = flashllm_cmd(bundle, args, "100%", tokens=1)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
    s = stats_line(result.stderr) if result.returncode == 0 else None
    if not s or "overhead_bytes" not in s:
        return None, f"exit {result.returncode}: {result.stderr.strip()[-300:]}"
    return int(s["overhead_bytes"]), ""


def run_flashllm_direct(bundle: Path, args, cap: int | None, overhead: int) -> Result:
    """flashllm generate under the same cgroup cap as llama.cpp, --dram-budget = cap - overhead
    (uncapped: 100%, in a cgroup of the machine's RAM only to read the peak)."""
    name = "flashllm"
    budget = None if cap is None else cap - overhead
    if budget is not None and budget <= 0:
        return Result(name, cap, False, note=f"cap {cap / 1e6:.0f} MB <= overhead {overhead / 1e6:.0f} MB")
    cmd = flashllm_cmd(bundle, args, "100%" if budget is None else str(budget))
    drop_bundle_cache(bundle)
    w = watch(cmd, cap if cap is not None else machine_ram(), args.timeout)
    if w.returncode != 0:
        why = "OOM-killed" if w.oom else f"exit {w.returncode}"
        return Result(name, cap, False, note=f"{why}: {w.stderr.strip()[-300:]}", peak_bytes=w.peak_bytes,
                      budget_bytes=budget)
    c = stats_line(w.stderr)
    if not c:
        return Result(name, cap, False, note="no --stats json line", peak_bytes=w.peak_bytes, budget_bytes=budget)
    tokens = c.get("tokens") or 0
    kernel = c.get("kernel_bytes_read")
    note = ", ".join(part for part in (
        f"mode {c['mode']}" if "mode" in c else "",
        f"policy {c['policy']}" if "policy" in c else "",
        f"budget {c['budget_bytes'] / 1e6:.0f} MB" if c.get("budget_bytes") else "",
        f"overhead {overhead / 1e6:.0f} MB",
        f"peak RSS {c['peak_rss_bytes'] / 1e6:.0f} MB" if c.get("peak_rss_bytes") else "",
        f"kernel read {kernel / max(tokens, 1) / 1e6:.1f} MB/token" if kernel is not None else "",
    ) if part)
    if args.verbose:
        say(f"--- flashllm, cap {fmt_cap(cap)}: stdout\n{w.stdout.strip()}")
    return Result(name, cap, True, c.get("tokens_per_s"), c.get("bytes_read_per_token"), tokens, note,
                  w.peak_bytes, budget if budget is not None else c.get("budget_bytes"))


def median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def main_direct(args, binary: Path) -> int:
    gguf = args.gguf or resolve(MODEL, progress=say)
    size = gguf.stat().st_size
    caps = parse_caps(args.caps)
    extra = () if args.allow_repack else ("--no-repack",)
    if extra and not _has_option(binary, "--no-repack"):
        raise SystemExit(f"{binary} has no --no-repack option (a newer llama.cpp is needed)")
    llama_name = f"llama.cpp {gguf.stem.rsplit('.', 1)[-1]} (mmap)"
    bundle = args.flashllm_bundle
    say(f"GGUF {gguf} = {size / 1e6:.0f} MB, read directly (no F16 conversion); llama.cpp flags: "
        f"{' '.join(extra) or '(repacking allowed)'}")
    limits = {}
    for pct in caps:
        limits[cap_label(pct)] = None if pct is None else int(size * pct / 100) + 300 * MiB
        say(f"  cap {cap_label(pct):>5}: " + ("no cap" if pct is None else
            f"{pct:g}% of the file + 300 MiB = {limits[cap_label(pct)] / 1e6:.0f} MB"))
    overhead = None
    if bundle is not None:
        if not bundle.exists():
            raise SystemExit(f"--flashllm-bundle {bundle}: no such bundle")
        say(f"flashllm bundle {bundle}, extra args {args.flashllm_args or '(none)'}: measuring its overhead "
            f"(uncapped 1-token run) ...")
        overhead, why = flashllm_overhead(bundle, args)
        if overhead is None:
            say(f"flashllm failed, its runs are skipped: {why}")
        else:
            say(f"flashllm overhead {overhead / 1e6:.0f} MB: --dram-budget = cap - overhead")
    say(f"prompt {args.prompt!r}, {args.tokens} tokens, {args.threads} threads, greedy, {args.rounds} round(s); "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other work skews tokens/s)\n")

    results: list[Result] = []
    for round_ in range(1, args.rounds + 1):
        for pct in caps:
            label, cap = cap_label(pct), limits[cap_label(pct)]
            engines = [llama_name] + (["flashllm"] if overhead is not None else [])
            if round_ % 2 == 0:  # alternate who goes first, so drift hits both
                engines.reverse()
            for engine in engines:
                say(f"round {round_}, cap {label}: {engine}, cgroup {fmt_cap(cap)} ...")
                if engine == llama_name:
                    r = run_llama(binary, gguf, args, cap, llama_name, extra, warm=False, cgroup_limit=machine_ram())
                else:
                    r = run_flashllm_direct(bundle, args, cap, overhead)
                r.round, r.label = round_, label
                results.append(r)
                tps = f"{r.tokens_per_s:.2f} tokens/s" if r.tokens_per_s is not None else "-"
                say(f"  {r.engine}: {tps}, {'' if r.ok else 'FAILED: '}{r.note}")

    say("")
    def cells(r: Result | None) -> str:
        if r is None:
            return f"{'':>8} {'':>9} {'':>9}"
        if not r.ok:
            return f"{'FAILED':>8} {'-':>9} {_mb(r.peak_bytes):>9}"
        tps = f"{r.tokens_per_s:.2f}" if r.tokens_per_s is not None else "-"
        return f"{tps:>8} {_mb(r.bytes_per_token, 1):>9} {_mb(r.peak_bytes):>9}"

    flash_on = overhead is not None
    head = f"{'cap':>5} {'cgroup cap':>11} {'round':>5} | {'tok/s':>8} {'MB/token':>9} {'peak MB':>9}"
    say(f"{'':24}{llama_name:^29}" + (f"   {'flashllm':^29}" if flash_on else ""))
    say(head + (f" | {'tok/s':>8} {'MB/token':>9} {'peak MB':>9} {'budget MB':>10}" if flash_on else ""))
    for round_ in range(1, args.rounds + 1):
        for pct in caps:
            label = cap_label(pct)
            pick = {r.engine: r for r in results if r.round == round_ and r.label == label}
            line = f"{label:>5} {fmt_cap(limits[label]):>11} {round_:>5} | {cells(pick.get(llama_name))}"
            if flash_on:
                f = pick.get("flashllm")
                line += f" | {cells(f)} {_mb(f.budget_bytes if f else None):>10}"
            say(line)
    if flash_on:
        say("")
        for pct in caps:
            label = cap_label(pct)
            ll = median([r.tokens_per_s for r in results if r.label == label and r.engine == llama_name and r.ok])
            fl = median([r.tokens_per_s for r in results if r.label == label and r.engine == "flashllm" and r.ok])
            lb = median([r.bytes_per_token for r in results if r.label == label and r.engine == llama_name and r.ok])
            fb = median([r.bytes_per_token for r in results if r.label == label and r.engine == "flashllm" and r.ok])
            line = f"cap {label}, medians: flashllm / llama.cpp "
            line += f"{fl / ll:.2f}x tokens/s" if ll and fl else "tokens/s -"
            if lb is not None and fb is not None:
                line += f"; MB read/token {fb / 1e6:.1f} vs {lb / 1e6:.1f}"
                line += f" ({lb / fb:.1f}x fewer)" if lb and fb else ""
            say(line)
    return 0 if all(r.ok for r in results) else 1


def _mb(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value / 1e6:,.{digits}f}"


# ---------------------------------------------------------------- main


def int4_predictors(bundle: Path) -> bool:
    try:
        settings = json.loads((bundle / "predictors.json").read_text())
        return settings.get("kind") == "int4" and bool(settings.get("gated"))
    except (OSError, ValueError):
        return False


def fmt_cap(cap: int | None) -> str:
    return "none" if cap is None else f"{cap / MiB:.0f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt", default="def quicksort(arr):")
    parser.add_argument("--budget-percent", type=float, default=50.0, help="of the F16 file (default 50)")
    parser.add_argument("--bundle", type=Path, default=None,
                        help=f"flashllm bundle of Qwen (default: {default_bundle()}, made on first use)")
    parser.add_argument("--skip-build", action="store_true", help="use the cached llama.cpp build; never build")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--verbose", "-v", action="store_true", help="print the generated texts")
    direct = parser.add_argument_group("--gguf-direct: llama.cpp on the quantized GGUF itself (no F16)")
    direct.add_argument("--gguf-direct", "--quantized", dest="gguf_direct", action="store_true",
                        help="run llama.cpp on the Q4_K_M GGUF at each of --caps, with --no-repack")
    direct.add_argument("--gguf", type=Path, default=None, help=f"the GGUF (default: the pulled {MODEL})")
    direct.add_argument("--caps", default="50,75,full",
                        help="percentages of the GGUF file size, cgroup = pct%% of the file + 300 MiB; "
                             "full = no cap (default 50,75,full)")
    direct.add_argument("--rounds", type=int, default=2, help="rounds over all caps (default 2)")
    direct.add_argument("--allow-repack", action="store_true",
                        help="let llama.cpp repack Q4 weights (drops --no-repack; crashes on the project's VMs)")
    direct.add_argument("--flashllm-bundle", type=Path, default=None,
                        help="also run `flashllm generate` on this bundle under the same caps, interleaved")
    direct.add_argument("--flashllm-args", default="",
                        help='extra arguments for flashllm generate, one string: "--gate-up int4", or '
                             '--flashllm-args=--verbose for a lone option')
    args = parser.parse_args()
    if args.flashllm_bundle is not None and not args.gguf_direct:
        parser.error("--flashllm-bundle goes with --gguf-direct (the fp16 mode uses --bundle)")

    reason = cgroup_unavailable_reason()
    if reason:
        say(f"cannot cap memory here: {reason}")
        return 2
    binary, quantize, build_seconds = build_llamacpp(args.skip_build)
    say(f"llama.cpp: {binary}" + (f" (built in {build_seconds:.0f} s)" if build_seconds else " (cached build)"))
    if args.gguf_direct:
        return main_direct(args, binary)
    f16 = make_f16(quantize)
    size = f16.stat().st_size
    budget = int(size * args.budget_percent / 100)
    llama_cap = budget + 300 * MiB
    bundle = args.bundle or default_bundle()
    if args.bundle is None and not (bundle / "manifest.json").exists():
        say(f"making the flashllm bundle {bundle} (once)")
        subprocess.run([sys.executable, "-m", "flashllm", "convert", MODEL, str(bundle)], check=True)
    predictors = (bundle / "predictors.json").exists()
    say(f"F16 GGUF {f16} = {size / 1e6:.0f} MB; budget {args.budget_percent:g}% = {budget / 1e6:.0f} MB; "
        f"llama.cpp cap = budget + 300 MiB = {llama_cap / 1e6:.0f} MB")
    say(f"bundle {bundle}: predictors {'present' if predictors else 'ABSENT (flashllm reads dense from flash)'}")
    say(f"prompt {args.prompt!r}, {args.tokens} tokens, {args.threads} threads, greedy; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other work skews tokens/s)\n")

    results = []
    say("a) llama.cpp F16, no cap ...")
    free_llama = run_llama(binary, f16, args, None)
    results.append(free_llama)
    say(f"b) llama.cpp F16, cap {fmt_cap(llama_cap)} ...")
    capped_llama = run_llama(binary, f16, args, llama_cap)
    results.append(capped_llama)
    say(f"c) flashllm, --dram-budget {budget} B, free run then capped at budget + overhead ...")
    free_flash, capped_flash = run_flashllm(bundle, budget, args)
    results += [free_flash] + ([capped_flash] if capped_flash else [])
    flashes = [capped_flash]
    if int4_predictors(bundle):  # gate/up from the 4-bit predictors, down columns from a split copy
        from flashllm.measure.bench import split_bundle

        split = split_bundle(bundle)
        say(f"d) flashllm --gate-up int4 on the split copy {split}, free run then capped ...")
        free_int4, capped_int4 = run_flashllm(split, budget, args, "int4")
        results += [free_int4] + ([capped_int4] if capped_int4 else [])
        flashes.append(capped_int4)

    say("")
    say(f"{'engine':24} {'cgroup cap':>11} {'tokens/s':>9} {'MB read/token':>14}  notes")
    for r in results:
        tps = f"{r.tokens_per_s:.2f}" if r.tokens_per_s is not None else "-"
        mb = f"{r.bytes_per_token / 1e6:.1f}" if r.bytes_per_token is not None else "-"
        say(f"{r.engine:24} {fmt_cap(r.cap_bytes):>11} {tps:>9} {mb:>14}  {'' if r.ok else 'FAILED: '}{r.note}")
    for capped in flashes:
        if capped_llama.ok and capped and capped.ok and capped_llama.tokens_per_s:
            ratio = capped.tokens_per_s / capped_llama.tokens_per_s
            line = f"\n{capped.engine} / llama.cpp under the cap: {ratio:.2f}x tokens/s"
            if capped_llama.bytes_per_token and capped.bytes_per_token:
                line += f", {capped_llama.bytes_per_token / capped.bytes_per_token:.1f}x fewer bytes read per token"
            say(line)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
