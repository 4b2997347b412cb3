"""User-facing errors: the CLI prints their message (which names the file, key or tensor) and exits 1."""


class TeleChat2Error(ValueError):
    """Base of every error caused by the user's input rather than by a bug."""


class InputError(TeleChat2Error):
    """An input file that cannot be read as what it should be (encoding, JSON, YAML); names file and line."""


class OwnershipError(TeleChat2Error):
    """An output folder telechat2 may not write into or replace (another run, not ours, overlaps an input)."""
