"""Presets that users tune, as data: the bench strategies (configs/strategies/NAME.toml) and per-model
recommendations (configs/models/NAME.toml), loaded by `--config FILE|NAME`.

A config file has sections named after what they set: [flash] (FlashSettings fields), [generate]
(generate's options, e.g. dram_budget), [train] (train-predictor's), [bench] (bench's). Options given
on the command line win over the file, which wins over the defaults.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Callable

from flashllm.errors import FlashLLMError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
KINDS = ("models", "strategies")
# the order bench reports strategies in: the paper's baselines first, then each technique added
STRATEGY_ORDER = ("naive", "hybrid", "page-cache", "predictor", "predictor+window", "all", "oracle", "int4-gate-up")


def available(kind: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.toml"))


def load_config(name_or_path: str | Path, kind: str | None = None) -> dict:
    """A config by file path, or by preset name (a model preset, else a strategy preset)."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        kinds = (kind,) if kind else KINDS
        path = next((CONFIG_DIR / k / f"{name_or_path}.toml" for k in kinds
                     if (CONFIG_DIR / k / f"{name_or_path}.toml").is_file()), None)
        if path is None:
            names = ", ".join(n for k in kinds for n in available(k))
            raise FlashLLMError(f"--config {name_or_path}: no such file or preset (presets: {names})")
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise FlashLLMError(f"{path}: not a readable TOML config ({e})") from None


def section(config: dict, name: str, allowed: set[str] | tuple[str, ...]) -> dict:
    """The [name] table of a config, refusing keys that are not among `allowed`."""
    table = config.get(name, {})
    if not isinstance(table, dict):
        raise FlashLLMError(f"config: [{name}] must be a table")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise FlashLLMError(f"config: [{name}] has unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
    return dict(table)


def strategies() -> dict[str, dict]:
    """Every bench strategy preset, in report order."""
    found = {name: load_config(name, "strategies") for name in available("strategies")}
    return {name: found[name] for name in sorted(found, key=lambda n: (STRATEGY_ORDER + (n,)).index(n))}


def apply_config(params: dict, unset: Callable[[str], bool], config: str | None, command: str,
                 flash_fields: set[str]) -> tuple[dict, dict]:
    """A command's parameters with the config's [command] values (and [flash] values that name one of
    its options) wherever `unset(option)` says the command line left it at its default; plus the [flash]
    values that have no option of their own (FlashSettings fields such as pin_fraction)."""
    params = dict(params)
    if config is None:
        return params, {}
    preset = load_config(config)
    for key, value in section(preset, command, set(params) - {"config"}).items():
        if unset(key):
            params[key] = value
    flash_only = {}
    for key, value in (section(preset, "flash", flash_fields) if flash_fields else {}).items():
        if key not in params:
            flash_only[key] = value
        elif unset(key):
            params[key] = value
    return params, flash_only
