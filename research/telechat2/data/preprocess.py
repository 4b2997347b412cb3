"""JSON lines -> packed MindRecord samples for pretraining and fine-tuning (`telechat2 preprocess ...`).

Output: a folder DIR holding `data.mindrecord` (+ its index `data.mindrecord.db`) and `meta.json` (kind,
seq_length, columns, tokenizer path/sha256/size, seed, inputs and the summary). Every column is int32 with
shape [seq_length + 1] (the trainer feeds ids[:-1] and predicts ids[1:]).

pretrain (`{"text": str}` lines, or `{"input_ids": [int, ...]}` already tokenized):
    input_ids     each document's ids followed by `<_end>` (id 2), documents concatenated in (seeded) order,
                  cut into windows of seq_length + 1 with stride seq_length: window k is
                  stream[k*S : k*S + S + 1], so consecutive windows share one token and every token of the
                  stream except the first is a target exactly once. The last partial window is dropped
                  (counted as "tail tokens dropped").
    position_ids  (--reset-position-ids) position inside the document, 0 after each `<_end>` and at the
                  start of the window; the `<_end>` belongs to the document it ends.
    segment_ids   (--reset-attention-mask) document number inside the window (0, 1, ...); attend only where
                  segment_ids[i] == segment_ids[j] and j <= i.

sft (`{"system": str, "dialog": [{"role": "user"|"bot"|"assistant"|"tool", "content": str,
"tool_calls": [...]}, ...], "tools": [...]}` or `{"input": str, "output": str}` lines):
    input_ids     conversations rendered with the chat template (no generation prompt), packed whole in
                  (seeded) order into windows of seq_length + 1 (a conversation is never split); the rest
                  of a window is `<_pad>` (id 3). --no-pack puts one conversation per window.
    labels        input_ids on assistant content + tool calls + its `<_end>`, -100 elsewhere (prompt,
                  `<_bot>`, the `\\n` after `<_end>`, padding). Not shifted.
    position_ids, segment_ids   as above, per conversation; the padding is one more segment, positions from 0.
    A conversation longer than seq_length + 1 is truncated to it (--overlong truncate, the default; dropped if
    nothing learnable is left) or dropped (--overlong drop); both are counted in the summary.

Lines are parsed and tokenized by --workers processes (`spawn`), results are consumed in input order, and the
only randomness is the seeded order of documents/conversations, so the output depends on the inputs and
--seed only, not on the number of workers. Everything is held in memory before packing (one int32 per token,
plus labels for sft). A bad line (not UTF-8, invalid JSON, missing/unknown role, empty dialogue, no assistant
turn, token id outside the vocabulary, ...) stops the run naming `file:line` (--on-error fail, the default) or
is skipped and counted (--on-error skip). The folder is written under a temporary name and renamed at the end;
an existing DIR is only replaced with --force.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..checkpoint.manifest import sha256
from ..errors import TeleChat2Error
from ..ownership import check_replaceable, refuse_overlap, write_marker
from ..tokenizer.template import TemplateError, render_segments

DATA_FILE = "data.mindrecord"
META_FILE = "meta.json"
IGNORE_INDEX = -100
EOS_ID, PAD_ID = 2, 3
LINES_PER_TASK = 256
MAX_REPORTED_SKIPS = 20


class PreprocessError(TeleChat2Error):
    """Bad preprocessing input or options; line errors read `file:line: reason`."""


class LineError(Exception):
    """One input line is unusable. `reason` is the category counted in the summary."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Options:
    kind: str                          # "pretrain" | "sft"
    inputs: list[str]
    tokenizer: str
    seq_length: int
    output: str
    workers: int = 1
    seed: int = 0
    shuffle: bool = True
    on_error: str = "fail"             # "fail" | "skip"
    force: bool = False
    vocab_size: int | None = None      # None: the tokenizer's size
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    overlong: str = "truncate"         # sft: "truncate" | "drop"
    pack: bool = True                  # sft: several conversations per window
    progress: bool = True


@dataclass
class Summary:
    kind: str
    seq_length: int
    lines: int = 0                     # non-blank lines read
    records: int = 0                   # documents / conversations accepted
    skipped: Counter = field(default_factory=Counter)     # bad lines by reason
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)     # accepted records left out, by reason
    record_tokens: int = 0             # tokens of the accepted records (pretrain: with their <_end>)
    samples: int = 0
    sample_tokens: int = 0             # non-padding ids written
    learned_tokens: int = 0            # sft: labels != -100
    padding: int = 0
    tail_dropped: int = 0              # pretrain: stream tokens after the last full window
    workers: int = 1
    tokenize_seconds: float = 0.0      # reading, parsing and tokenizing the lines
    seconds: float = 0.0               # the whole run

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["skipped"], d["dropped"] = dict(self.skipped), dict(self.dropped)
        return d

    def format(self, output: str) -> str:
        def reasons(c: Counter) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) if c else ""

        what = "documents" if self.kind == "pretrain" else "conversations"
        skipped = sum(self.skipped.values())
        dropped = sum(self.dropped.values())
        n1 = self.seq_length + 1
        lines = [f"preprocess {self.kind}: {self.samples} samples of {n1} ids -> {output} ({self.seconds:.1f} s)",
                 f"  lines read      {self.lines:>10,}   skipped {skipped}" + (f" ({reasons(self.skipped)})"
                                                                             if skipped else ""),
                 f"  {what:<15} {self.records:>10,}   truncated {self.truncated}, dropped {dropped}"
                 + (f" ({reasons(self.dropped)})" if dropped else ""),
                 f"  tokens          {self.record_tokens:>10,}   in samples {self.sample_tokens:,}"]
        if self.kind == "pretrain":
            lines.append(f"  tail dropped    {self.tail_dropped:>10,}   tokens after the last full window")
        else:
            total = self.samples * n1
            lines.append(f"  learned tokens  {self.learned_tokens:>10,}   padding {self.padding:,} "
                         f"({100 * self.padding / max(total, 1):.1f}% of the samples)")
        if self.tokenize_seconds > 0:
            lines.append(f"  tokenize speed  {self.record_tokens / self.tokenize_seconds:>10,.0f}   tokens/s "
                         f"with {self.workers} process{'es' if self.workers > 1 else ''}")
        return "\n".join(lines)


# ---- one line -> ids (runs in the worker processes) ------------------------------------------------

def _decode_line(raw: bytes, first: bool) -> object:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LineError("not UTF-8", f"invalid UTF-8 byte 0x{raw[e.start]:02x} at byte {e.start}") from None
    text = text.rstrip("\r\n")
    if first:
        text = text.lstrip("\ufeff")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise LineError("invalid JSON", f"invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise LineError("not an object", f"expected one JSON object per line, got {type(obj).__name__}")
    return obj


def _check_vocab(ids, vocab_size: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(np.flatnonzero((ids < 0) | (ids >= vocab_size))[0])
        raise LineError("token id outside the vocabulary",
                        f"token id {int(ids[bad])} at position {bad} is outside the vocabulary [0, {vocab_size})")


def pretrain_source(obj: dict) -> str | np.ndarray:
    """The text of one pretraining line to encode, or its already tokenized ids."""
    if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str):
            raise LineError("invalid text", f"'text' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise LineError("empty document", "empty 'text'")
        return text
    if "input_ids" in obj:
        ids = obj["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise LineError("invalid input_ids", "'input_ids' must be a list of integers")
        if not ids:
            raise LineError("empty document", "empty 'input_ids'")
        return np.asarray(ids, dtype=np.int64)
    raise LineError("missing text", f"no 'text' (or 'input_ids') field; keys: {', '.join(obj) or 'none'}")


def sft_conversation(obj: dict) -> tuple[list[dict], list | None]:
    """(messages, tools) of one line in either TeleChat2 SFT format."""
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise LineError("invalid system", f"'system' must be a string, got {type(system).__name__}")
    head = [{"role": "system", "content": system}] if system is not None else []
    if "dialog" in obj:
        dialog = obj["dialog"]
        if not isinstance(dialog, list):
            raise LineError("invalid dialog", f"'dialog' must be a list of messages, got {type(dialog).__name__}")
        if not dialog:
            raise LineError("empty dialogue", "'dialog' is empty")
        messages = head + dialog
    elif "input" in obj or "output" in obj:
        for key in ("input", "output"):
            if not isinstance(obj.get(key), str):
                raise LineError("invalid input/output", f"'{key}' must be a string")
        if not obj["output"].strip():
            raise LineError("empty dialogue", "empty 'output'")
        messages = head + [{"role": "user", "content": obj["input"]},
                           {"role": "assistant", "content": obj["output"]}]
    else:
        raise LineError("unknown format", "expected 'dialog' (with optional 'system', 'tools') or 'input'/'output'")
    return messages, obj.get("tools") or None


def sft_source(obj: dict) -> list[tuple[str, bool]]:
    """The (text, learned) pieces of one SFT line (see `template.render_segments`)."""
    messages, tools = sft_conversation(obj)
    try:
        return render_segments(messages, tools, add_generation_prompt=False)
    except TemplateError as e:
        raise LineError(e.reason, str(e)) from None


_worker: dict = {}


def _init_worker(tokenizer_path: str, kind: str, vocab_size: int | None, num_threads: int = 1) -> None:
    from ..tokenizer import TeleChat2Tokenizer
    tok = TeleChat2Tokenizer(tokenizer_path, num_threads=num_threads)
    _worker.update(tok=tok, kind=kind, vocab=vocab_size or tok.vocab_size)


@dataclass
class _TaskResult:
    """What a worker sends back for one batch of lines: the records concatenated (cheap to pickle)."""
    file_index: int
    lengths: np.ndarray                 # [n records] int64
    ids: np.ndarray                     # [sum(lengths)] int32
    labels: np.ndarray | None           # sft: [sum(lengths)] int32
    errors: list[tuple[int, str, str]]  # (line number, reason, message), in line order

    def records(self) -> list:
        if not len(self.lengths):
            return []
        cuts = np.cumsum(self.lengths)[:-1]
        ids = np.split(self.ids, cuts)
        return ids if self.labels is None else list(zip(ids, np.split(self.labels, cuts)))


def _process(task: tuple[int, list[tuple[int, bytes]]]) -> _TaskResult:
    """Parse one batch of lines of one file, tokenize all their text in one batch call, check the ids."""
    tok, kind, vocab = _worker["tok"], _worker["kind"], _worker["vocab"]
    file_index, lines = task
    source = pretrain_source if kind == "pretrain" else sft_source
    parsed, errors = [], []
    for lineno, raw in lines:
        try:
            parsed.append((lineno, source(_decode_line(raw, lineno == 1))))
        except LineError as e:
            errors.append((lineno, e.reason, str(e)))
    if kind == "pretrain":
        texts = [src for _, src in parsed if isinstance(src, str)]
    else:
        texts = [text for _, segs in parsed for text, _ in segs]
    encoded = iter(tok.encode_batch(texts))
    ids_out, labels_out = [], []
    for lineno, src in parsed:
        if kind == "pretrain":
            ids = np.append(np.asarray(next(encoded) if isinstance(src, str) else src, dtype=np.int64), EOS_ID)
        else:
            pieces = [(next(encoded), learned) for _, learned in src]
            ids = np.asarray([i for p, _ in pieces for i in p], dtype=np.int64)
            labels = np.asarray([i if learned else IGNORE_INDEX for p, learned in pieces for i in p], np.int32)
        try:
            _check_vocab(ids, vocab)
            if kind == "sft" and not (labels != IGNORE_INDEX).any():
                raise LineError("no assistant turn", "no assistant message to learn from")
        except LineError as e:
            errors.append((lineno, e.reason, str(e)))
            continue
        ids_out.append(ids.astype(np.int32))
        if kind == "sft":
            labels_out.append(labels)
    errors.sort()
    return _TaskResult(
        file_index, np.array([len(r) for r in ids_out], dtype=np.int64),
        np.concatenate(ids_out) if ids_out else np.zeros(0, np.int32),
        (np.concatenate(labels_out) if labels_out else np.zeros(0, np.int32)) if kind == "sft" else None,
        errors)


# ---- the run ---------------------------------------------------------------------------------------

def _tasks(inputs: list[str], bar, counts: Counter):
    for fi, path in enumerate(inputs):
        lines, nbytes = [], 0
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                nbytes += len(raw)
                if not raw.strip():
                    continue
                counts["lines"] += 1
                lines.append((lineno, raw))
                if len(lines) == LINES_PER_TASK:
                    bar.update(nbytes)
                    yield fi, lines
                    lines, nbytes = [], 0
        bar.update(nbytes)
        if lines:
            yield fi, lines


def _read_records(opts: Options, summary: Summary) -> list:
    from tqdm import tqdm

    total = sum(os.path.getsize(p) for p in opts.inputs)
    counts: Counter = Counter()
    records = []
    reported = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenize ({opts.workers} proc)",
              disable=not opts.progress, file=sys.stderr) as bar:
        tasks = _tasks(opts.inputs, bar, counts)
        pool = None
        if opts.workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(
                opts.workers, initializer=_init_worker, initargs=(opts.tokenizer, opts.kind, opts.vocab_size))
            results = pool.imap(_process, tasks)
        else:
            _init_worker(opts.tokenizer, opts.kind, opts.vocab_size, num_threads=-1)
            results = map(_process, tasks)
        try:
            for res in results:
                for lineno, reason, msg in res.errors:
                    where = f"{opts.inputs[res.file_index]}:{lineno}"
                    if opts.on_error == "fail":
                        raise PreprocessError(f"{where}: {msg} (pass --on-error skip to skip bad lines)")
                    summary.skipped[reason] += 1
                    if reported < MAX_REPORTED_SKIPS:
                        bar.write(f"warning: {where}: {msg}; skipped", file=sys.stderr)
                        reported += 1
                records.extend(res.records())
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    summary.lines = counts["lines"]
    if sum(summary.skipped.values()) > reported:
        print(f"warning: {sum(summary.skipped.values()) - reported} more bad lines skipped", file=sys.stderr)
    return records


def _positions_segments(starts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """position_ids and segment_ids of a window whose segments begin at `starts` (0 included)."""
    is_start = np.zeros(n, dtype=bool)
    is_start[starts] = True
    idx = np.arange(n)
    seg_start = np.maximum.accumulate(np.where(is_start, idx, 0))
    return (idx - seg_start).astype(np.int32), (np.cumsum(is_start) - 1).astype(np.int32)


def pack_pretrain(docs: list[np.ndarray], seq_length: int, summary: Summary) -> dict[str, np.ndarray]:
    stream = np.concatenate(docs) if docs else np.zeros(0, np.int32)
    n1 = seq_length + 1
    num = (len(stream) - 1) // seq_length if len(stream) >= n1 else 0
    if num == 0:
        raise PreprocessError(f"the inputs hold {len(stream)} tokens; one sample needs seq_length + 1 = {n1}")
    windows = np.lib.stride_tricks.sliding_window_view(stream, n1)[::seq_length][:num]   # a view, no copy
    input_ids = np.ascontiguousarray(windows, dtype=np.int32)
    summary.samples = num
    summary.sample_tokens = int(input_ids.size)
    summary.tail_dropped = len(stream) - (num * seq_length + 1)
    return {"input_ids": input_ids}


def pack_sft(convs: list[tuple[np.ndarray, np.ndarray]], seq_length: int, overlong: str, pack: bool,
             summary: Summary) -> tuple[dict[str, np.ndarray], list[list[int]]]:
    """Windows of whole conversations; returns the columns and each window's segment starts."""
    n1 = seq_length + 1
    kept = []
    for ids, labels in convs:
        if len(ids) > n1:
            if overlong == "drop":
                summary.dropped[f"longer than seq_length + 1 = {n1}"] += 1
                continue
            ids, labels = ids[:n1], labels[:n1]
            if not (labels != IGNORE_INDEX).any():
                summary.dropped["nothing to learn after truncation"] += 1
                continue
            summary.truncated += 1
        kept.append((ids, labels))
    if not kept:
        raise PreprocessError("no conversation left to write (all dropped)")
    bins: list[list[int]] = []
    cur, used = [], 0
    for k, (ids, _) in enumerate(kept):
        if cur and (not pack or used + len(ids) > n1):
            bins.append(cur)
            cur, used = [], 0
        cur.append(k)
        used += len(ids)
    bins.append(cur)
    input_ids = np.full((len(bins), n1), PAD_ID, dtype=np.int32)
    labels = np.full((len(bins), n1), IGNORE_INDEX, dtype=np.int32)
    starts = []
    for b, members in enumerate(bins):
        pos, s = 0, []
        for k in members:
            ids, lab = kept[k]
            input_ids[b, pos:pos + len(ids)] = ids
            labels[b, pos:pos + len(ids)] = lab
            s.append(pos)
            pos += len(ids)
        if pos < n1:
            s.append(pos)                 # the padding is a segment of its own
        starts.append(s)
    summary.samples = len(bins)
    summary.sample_tokens = int(sum(len(ids) for ids, _ in kept))
    summary.padding = int(input_ids.size) - summary.sample_tokens
    summary.learned_tokens = int((labels != IGNORE_INDEX).sum())
    return {"input_ids": input_ids, "labels": labels}, starts


def _write_mindrecord(path: str, columns: dict[str, np.ndarray], kind: str, progress: bool) -> None:
    from mindspore.mindrecord import FileWriter
    from tqdm import tqdm

    n, n1 = next(iter(columns.values())).shape
    writer = FileWriter(path, shard_num=1, overwrite=True)
    writer.add_schema({name: {"type": "int32", "shape": [n1]} for name in columns}, f"telechat2_{kind}")
    step = 1024
    with tqdm(total=n, unit="sample", desc="write", disable=not progress, file=sys.stderr) as bar:
        for a in range(0, n, step):
            b = min(n, a + step)
            writer.write_raw_data([{name: col[i] for name, col in columns.items()} for i in range(a, b)])
            bar.update(b - a)
    writer.commit()


def _validate(opts: Options) -> None:
    if opts.kind not in ("pretrain", "sft"):
        raise PreprocessError(f"unknown kind {opts.kind!r}")
    if not isinstance(opts.seq_length, int) or opts.seq_length < 1:
        raise PreprocessError(f"--seq-length must be a positive integer, got {opts.seq_length}")
    if opts.workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {opts.workers}")
    if opts.on_error not in ("fail", "skip"):
        raise PreprocessError(f"--on-error must be fail or skip, got {opts.on_error!r}")
    if opts.overlong not in ("truncate", "drop"):
        raise PreprocessError(f"--overlong must be truncate or drop, got {opts.overlong!r}")
    if not opts.inputs:
        raise PreprocessError("no --input file given")
    for p in opts.inputs:
        if not os.path.isfile(p):
            raise PreprocessError(f"{p}: no such input file")
    if os.path.lexists(opts.output) and not opts.force:
        raise PreprocessError(f"{opts.output} already exists; pass --force to replace it")
    refuse_overlap(opts.output, [("--input", p) for p in opts.inputs] + [("--tokenizer", opts.tokenizer)])
    if opts.force:
        check_replaceable(opts.output)              # only a folder telechat2 wrote (marker file) is replaced
    parent = os.path.dirname(os.path.abspath(opts.output))
    if not os.path.isdir(parent):
        raise PreprocessError(f"{parent}: the output's parent folder does not exist")


def run(opts: Options) -> Summary:
    """Preprocess `opts.inputs` into the MindRecord folder `opts.output`; return the summary."""
    from ..tokenizer import TeleChat2Tokenizer

    _validate(opts)
    t0 = time.perf_counter()
    tok = TeleChat2Tokenizer(opts.tokenizer)          # fail early on a bad tokenizer, before any worker starts
    if opts.vocab_size is not None and opts.vocab_size < 13:
        raise PreprocessError(f"--vocab-size {opts.vocab_size} cannot hold the 13 TeleChat2 special tokens")
    summary = Summary(opts.kind, opts.seq_length, workers=opts.workers)
    t1 = time.perf_counter()
    records = _read_records(opts, summary)
    summary.tokenize_seconds = time.perf_counter() - t1
    if not records:
        raise PreprocessError("no usable line in the inputs")
    summary.records = len(records)
    summary.record_tokens = int(sum(len(r if opts.kind == "pretrain" else r[0]) for r in records))

    order = np.random.default_rng(opts.seed).permutation(len(records)) if opts.shuffle else range(len(records))
    records = [records[i] for i in order]
    n1 = opts.seq_length + 1
    if opts.kind == "pretrain":
        columns = pack_pretrain(records, opts.seq_length, summary)
        ids = columns["input_ids"]
        # a segment starts at 0 and after every <_end> (the <_end> belongs to the document it ends)
        starts = [np.concatenate([[0], np.flatnonzero(row[:-1] == EOS_ID) + 1]) for row in ids]
    else:
        columns, starts = pack_sft(records, opts.seq_length, opts.overlong, opts.pack, summary)
    if opts.reset_position_ids or opts.reset_attention_mask:
        pos_seg = [_positions_segments(np.asarray(s, dtype=np.int64), n1) for s in starts]
        if opts.reset_position_ids:
            columns["position_ids"] = np.stack([p for p, _ in pos_seg])
        if opts.reset_attention_mask:
            columns["segment_ids"] = np.stack([s for _, s in pos_seg])

    output = os.path.abspath(opts.output)
    tmp = f"{output}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write_mindrecord(os.path.join(tmp, DATA_FILE), columns, opts.kind, opts.progress)
        summary.seconds = time.perf_counter() - t0
        files = {f: os.path.getsize(os.path.join(tmp, f)) for f in (DATA_FILE, DATA_FILE + ".db")}
        meta = {
            "format": f"telechat2-{opts.kind}", "version": 1, "kind": opts.kind,
            "seq_length": opts.seq_length, "num_samples": summary.samples,
            "columns": {name: {"dtype": "int32", "shape": [n1]} for name in columns},
            "pad_id": PAD_ID, "eos_id": EOS_ID, "ignore_index": IGNORE_INDEX,
            "tokenizer": {"path": os.path.abspath(opts.tokenizer), "sha256": sha256(opts.tokenizer),
                          "vocab_size": tok.vocab_size},
            "vocab_size": opts.vocab_size or tok.vocab_size,
            "seed": opts.seed, "shuffle": opts.shuffle, "inputs": [os.path.abspath(p) for p in opts.inputs],
            "options": {"reset_position_ids": opts.reset_position_ids,
                        "reset_attention_mask": opts.reset_attention_mask,
                        "overlong": opts.overlong, "pack": opts.pack, "on_error": opts.on_error},
            "summary": summary.to_dict(),
            "files": files,             # bytes per file: the trainer's pre-flight detects a truncated copy
        }
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        write_marker(tmp, "preprocess")
        _publish(tmp, output, opts.force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _publish(tmp: str, output: str, force: bool) -> None:
    """Rename the finished temporary folder onto `output` (replacing it only with force)."""
    if not os.path.lexists(output):
        os.rename(tmp, output)
        return
    if not force:
        raise PreprocessError(f"{output} appeared while preprocessing; not replacing it without --force")
    old = f"{output}.old-{os.getpid()}"
    os.rename(output, old)
    os.rename(tmp, output)
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old)
    else:
        os.remove(old)
