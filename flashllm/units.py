"""The one place a size typed by a user becomes bytes."""

from __future__ import annotations

import re

from flashllm.errors import FlashLLMError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_size(text: str | int, of: int | None = None, what: str = "size") -> int:
    """'1.5GB', '800MiB', '50%' (of `of`, e.g. the model's size), or plain bytes; `what` names the value
    in error messages ("budget")."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z%]*)\s*", str(text))
    if not m:
        raise FlashLLMError(f"malformed {what} {text!r} (examples: 1.5GB, 800MiB, 50%)")
    value, unit = float(m.group(1)), m.group(2).upper()
    if unit == "%":
        if of is None:
            raise FlashLLMError(f"{text!r}: a percentage needs something to be a percentage of")
        return int(of * value / 100)
    if unit not in _UNITS:
        raise FlashLLMError(f"malformed {what} {text!r}: unknown unit {m.group(2)!r} (B, KB, MB, GB, KiB, MiB, GiB, %)")
    return int(value * _UNITS[unit])
