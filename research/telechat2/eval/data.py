"""Reading evaluation inputs. Every problem names the file and line (or the missing columns) and is an
EvalError, raised before any weight is read."""
from __future__ import annotations

import csv
import io
import json
import os
import re

from ..errors import TeleChat2Error

LETTERS = "ABCDEFGHIJ"
SPLIT_SUFFIX = re.compile(r"_(dev|val|test|train)$")


class EvalError(TeleChat2Error):
    """Bad evaluation input: a file:line, missing columns, too few dev examples for the shots, ..."""


def _open_bytes(path: str) -> bytes:
    if not os.path.exists(path):
        raise EvalError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        raise EvalError(f"{path}: is a folder, not a file")
    with open(path, "rb") as fh:
        return fh.read()


def jsonl_objects(path: str):
    """(line number, dict) of every non-blank line."""
    for lineno, raw in enumerate(_open_bytes(path).split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise EvalError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                            f"{e.start + 1})") from None
        try:
            obj = json.loads(text.lstrip("\ufeff") if lineno == 1 else text)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise EvalError(f"{path}:{lineno}: expected one JSON object per line, got {type(obj).__name__}")
        yield lineno, obj


def input_files(path: str, exts: tuple[str, ...]) -> list[str]:
    """A file, or the files of a folder with one of `exts` (sorted)."""
    if not os.path.exists(path):
        raise EvalError(f"{path}: no such file or folder")
    if os.path.isfile(path):
        return [path]
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(exts))
    if not files:
        raise EvalError(f"{path}: no {' or '.join(exts)} files in this folder")
    return files


def subject_of(path: str) -> str:
    """`computer_network_val.csv` -> `computer_network` (C-Eval/MMLU names; CMMLU: `agronomy.csv`)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return SPLIT_SUFFIX.sub("", stem)


# ---- multiple choice ----------------------------------------------------------------------------------

def _choice_row(where: str, get, keys, letters: str) -> dict:
    question = get("question")
    if not isinstance(question, str) or not question.strip():
        raise EvalError(f"{where}: empty or missing 'question'")
    choices = []
    for letter in letters:
        c = get(letter)
        if not isinstance(c, str) and not (isinstance(c, (int, float)) and not isinstance(c, bool)):
            raise EvalError(f"{where}: choice {letter} must be text, got {c!r}")
        choices.append(str(c))
    answer = get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(letters):
        answer = letters[answer]                              # MMLU (HF datasets): the index of the choice
    answer = answer.strip().upper() if isinstance(answer, str) else answer
    if answer not in tuple(letters):
        raise EvalError(f"{where}: answer {get('answer')!r} is not one of {', '.join(letters)}")
    return {"question": question, "choices": choices, "answer": letters.index(answer)}


def _read_choice_csv(path: str) -> list[dict]:
    data = _open_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise EvalError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, start = [], 1
    try:
        for fields in reader:
            rows.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as e:
        raise EvalError(f"{path}:{reader.line_num}: not valid CSV: {e}") from None
    rows = [(n, f) for n, f in rows if any(x.strip() for x in f)]
    if not rows:
        raise EvalError(f"{path}: no rows")
    header = [h.strip().lower() for h in rows[0][1]]
    if "question" in header or "answer" in header:            # C-Eval (id,question,A..D,answer,...), CMMLU
        need = ["question", "a", "b", "c", "d", "answer"]
        missing = [n if len(n) > 1 else n.upper() for n in need if n not in header]
        if missing:
            raise EvalError(f"{path}:1: missing column(s) {', '.join(missing)} (header: {', '.join(rows[0][1])}); "
                            "expected question, A, B, C, D, answer")
        cols = {n: header.index(n) for n in need}
        body = rows[1:]
    elif len(header) == 6:                                    # MMLU: no header, question,A,B,C,D,answer
        cols = {n: i for i, n in enumerate(["question", "a", "b", "c", "d", "answer"])}
        body = rows
    else:
        raise EvalError(f"{path}:1: missing columns: no header with question, A, B, C, D, answer, and not the "
                        f"6 columns of an MMLU file (got {len(header)})")
    out = []
    for lineno, fields in body:
        where = f"{path}:{lineno}"
        if len(fields) <= max(cols.values()):
            raise EvalError(f"{where}: {len(fields)} field(s), expected at least {max(cols.values()) + 1}")
        row = _choice_row(where, lambda k: fields[cols[k.lower()]], cols, "ABCD")
        out.append({**row, "file": path, "line": lineno})
    return out


def _read_choice_jsonl(path: str) -> list[dict]:
    out = []
    for lineno, obj in jsonl_objects(path):
        where = f"{path}:{lineno}"
        if "choices" in obj:
            choices = obj["choices"]
            if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
                raise EvalError(f"{where}: 'choices' must be a list of 2 to {len(LETTERS)} texts")
            letters = LETTERS[:len(choices)]
            values = dict(zip(letters, choices))
        else:
            letters = "ABCD"
            values = {k: obj.get(k) for k in letters}
        missing = [k for k in ("question", "answer") if k not in obj] + \
            [k for k in letters if values.get(k) is None]
        if missing:
            raise EvalError(f"{where}: missing {', '.join(missing)} (keys: {', '.join(obj) or 'none'}); expected "
                            "question, A, B, C, D (or choices), answer")
        row = _choice_row(where, lambda k: values[k] if k in values else obj.get(k), None, letters)
        subject = obj.get("subject")
        out.append({**row, "file": path, "line": lineno,
                    **({"subject": subject} if isinstance(subject, str) and subject else {})})
    if not out:
        raise EvalError(f"{path}: no rows")
    return out


def read_choice_set(path: str) -> list[dict]:
    """Questions of a file or folder: {question, choices, answer (index), subject, file, line}."""
    rows = []
    for f in input_files(path, (".csv", ".jsonl")):
        part = _read_choice_jsonl(f) if f.endswith(".jsonl") else _read_choice_csv(f)
        for r in part:
            r.setdefault("subject", subject_of(f))
        rows += part
    return rows


# ---- generation (GSM8K style) -------------------------------------------------------------------------

def read_qa_set(path: str) -> list[dict]:
    """{"question": str, "answer": str|number} lines (GSM8K: the answer ends with `#### 72`)."""
    rows = []
    for f in input_files(path, (".jsonl",)):
        for lineno, obj in jsonl_objects(f):
            where = f"{f}:{lineno}"
            missing = [k for k in ("question", "answer") if k not in obj]
            if missing:
                raise EvalError(f"{where}: missing {', '.join(missing)} (keys: {', '.join(obj) or 'none'})")
            q, a = obj["question"], obj["answer"]
            if not isinstance(q, str) or not q.strip():
                raise EvalError(f"{where}: 'question' must be non-empty text")
            if isinstance(a, bool) or not isinstance(a, (str, int, float)):
                raise EvalError(f"{where}: 'answer' must be text or a number")
            from .generation import gold_answer
            gold = gold_answer(str(a))
            if gold is None:
                raise EvalError(f"{where}: no number in 'answer' ({str(a)[-60:]!r}); expected `#### N` or a number")
            rows.append({"question": q, "answer": str(a), "gold": gold, "file": f, "line": lineno})
        if not rows:
            raise EvalError(f"{f}: no rows")
    return rows


# ---- perplexity ---------------------------------------------------------------------------------------

def read_documents(path: str, tokenizer, eos_id: int = 2) -> list[list[int]]:
    """Token ids of each `{"text": ...}` (or `{"input_ids": [...]}`) line followed by `<_end>`, as
    `telechat2 preprocess pretrain` makes them."""
    from ..data.preprocess import LineError, pretrain_source
    docs = []
    for f in input_files(path, (".jsonl",)):
        texts = []
        for lineno, obj in jsonl_objects(f):
            try:
                src = pretrain_source(obj)
            except LineError as e:
                raise EvalError(f"{f}:{lineno}: {e}") from None
            if not isinstance(src, str):
                ids = [int(i) for i in src]
                bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
                if bad:
                    raise EvalError(f"{f}:{lineno}: token id {bad[0]} is outside the vocabulary "
                                    f"[0, {tokenizer.vocab_size})")
                texts.append(ids)
            else:
                texts.append(src)
        encoded = tokenizer.encode_batch([t for t in texts if isinstance(t, str)])
        it = iter(encoded)
        docs += [(next(it) if isinstance(t, str) else t) + [eos_id] for t in texts]
    if not docs:
        raise EvalError(f"{path}: no documents")
    return docs
