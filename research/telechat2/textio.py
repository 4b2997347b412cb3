"""Reading text inputs with errors that name the file, line and byte: UTF-8 decoding, JSON and YAML."""
from __future__ import annotations

import json

from .errors import InputError


def decode_utf8(data: bytes, where: str) -> str:
    """`data` decoded as UTF-8; otherwise an InputError naming `where`, the byte offset and the line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{where}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})"
                         ) from None


def check_utf8_str(text: str, where: str) -> str:
    """A command-line string that Python decoded with surrogateescape (undecodable bytes) is refused by name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        decode_utf8(text.encode("utf-8", "surrogateescape"), where)
        raise InputError(f"{where}: not UTF-8 text") from None
    return text


def read_text(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a file") from None
    return decode_utf8(data, path)


def read_json(path: str, what: str = "JSON"):
    """A JSON file; a missing, non-UTF-8 or malformed file is an InputError naming it and the line."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: line {e.lineno} column {e.colno}: not valid {what}: {e.msg}") from None


def read_yaml(path: str, error=InputError):
    """A YAML file read as UTF-8; errors (encoding, syntax, binary content) name the file and line."""
    import yaml
    try:
        text = read_text(path)
    except InputError as e:
        raise error(str(e)) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        if mark is None and getattr(e, "position", None) is not None:       # ReaderError: a control character
            line = text.count("\n", 0, e.position) + 1
            raise error(f"{path}: line {line}: not a text YAML file (character {e.character!r} at offset "
                        f"{e.position})") from None
        where = f"line {mark.line + 1}: " if mark else ""
        raise error(f"{path}: {where}invalid YAML: {getattr(e, 'problem', None) or e}") from None
