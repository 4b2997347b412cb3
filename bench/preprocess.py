"""Tokens/s of `telechat2 preprocess` with 1 process vs one per core, on the bundled sample corpus.

The sample files (configs/cpu/data) are repeated --repeat times into a temporary input so that worker start-up
is a small part of the run. Reports the tokenize phase (read + parse + chat template + SentencePiece, the part
that runs in the workers), the whole run (plus packing and MindRecord writing), the CPU seconds used (one
process already uses more than one core while SentencePiece encodes a batch with its own threads) and the
speed-up of all cores over one process. Each setting runs --trials times, alternating, and the fastest run is
reported (this machine is shared).

    python bench/preprocess.py [--repeat 100] [--workers N] [--trials 3]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "research"))
from telechat2.data.preprocess import Options, run  # noqa: E402

TOKENIZER = os.path.join(ROOT, "configs", "cpu", "tokenizer", "tokenizer.model")
DATA = os.path.join(ROOT, "configs", "cpu", "data")


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the pool workers are joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def repeated(src: str, dst: str, times: int) -> str:
    with open(src, "rb") as fh:
        body = fh.read()
    with open(dst, "wb") as fh:
        for _ in range(times):
            fh.write(body)
    return dst


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=100)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="the 'all cores' run")
    p.add_argument("--trials", type=int, default=3, help="runs of each setting; the fastest is reported")
    args = p.parse_args()
    import mindspore.mindrecord  # noqa: F401  (imported once here so no run pays the ~2 s import)
    tmp = tempfile.mkdtemp(prefix="bench_preprocess_")
    try:
        cases = [("pretrain", "pretrain.jsonl", 2047), ("sft", "sft.jsonl", 511)]
        load = os.getloadavg()[0]
        print(f"input: configs/cpu/data x {args.repeat}; tiny tokenizer; {os.cpu_count()} cores; "
              f"load average before the run {load:.2f}" + ("  (machine busy: numbers are low)" if load > 0.5 else ""))
        print(f"{'kind':<10}{'procs':>6}{'lines':>9}{'tokens':>11}{'tokenize s':>12}{'tokens/s':>11}"
              f"{'total s':>9}{'tokens/s':>11}{'cpu s':>8}{'speed-up':>10}")
        for kind, name, seq in cases:
            src = repeated(os.path.join(DATA, name), os.path.join(tmp, name), args.repeat)
            best = {}
            for trial in range(args.trials):               # alternate, keep the fastest run of each
                for workers in (1, args.workers):
                    out = os.path.join(tmp, f"{kind}_{workers}_{trial}")
                    cpu0 = cpu_seconds()
                    s = run(Options(kind, [src], TOKENIZER, seq, out, workers=workers, progress=False))
                    cpu = cpu_seconds() - cpu0
                    shutil.rmtree(out)
                    if workers not in best or s.tokenize_seconds < best[workers][0].tokenize_seconds:
                        best[workers] = (s, cpu)
            base = None
            for workers, (s, cpu) in best.items():
                tps = s.record_tokens / s.tokenize_seconds
                base = base or tps
                print(f"{kind:<10}{workers:>6}{s.lines:>9,}{s.record_tokens:>11,}{s.tokenize_seconds:>12.2f}"
                      f"{tps:>11,.0f}{s.seconds:>9.2f}{s.record_tokens / s.seconds:>11,.0f}{cpu:>8.1f}"
                      f"{tps / base:>10.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
