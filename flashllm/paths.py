"""Where flashllm keeps pulled models, I/O profiles and other cached state."""

import os
from pathlib import Path


def home() -> Path:
    """The cache folder: $FLASHLLM_HOME, else ~/.cache/flashllm."""
    env = os.environ.get("FLASHLLM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flashllm"
