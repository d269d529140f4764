"""The one exception type for expected failures; the CLI turns it into a one-line message."""


class FlashLLMError(Exception):
    """A failure a user can act on: bad path, unsupported model, budget too small, corrupt file."""
