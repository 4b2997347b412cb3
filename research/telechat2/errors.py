"""User-facing errors: the CLI prints their message (which names the file, key or tensor) and exits 1."""


class TeleChat2Error(ValueError):
    """Base of every error caused by the user's input rather than by a bug."""
