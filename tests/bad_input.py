"""Shared by the table-driven `test_bad_input_*.py` files: run a command as a user would, check the refusal,
and check that nothing the user had (inputs, earlier outputs) was modified."""
from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from dataclasses import dataclass, field
from typing import Callable

import cli_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = os.path.join(REPO, "configs", "cpu")
TOKENIZER = os.path.join(CPU, "tokenizer", "tokenizer.model")
# the bad-input commands run in the repo, each within 5 minutes
run_cli = functools.partial(cli_server.run_cli, cwd=REPO, timeout=300)


@dataclass
class Case:
    """One row: the command (built from the module's fixtures `ctx`), the exit code, the text stderr names."""
    name: str
    args: Callable[[dict], list]
    code: int
    needles: tuple = ()
    stdin: bytes | None = None
    stdout_needles: tuple = ()
    env: dict = field(default_factory=dict)

    def __str__(self):
        return self.name


def snapshot(*roots) -> dict:
    """{path: (size, sha256)} of every file under the roots (and the roots if files)."""
    out = {}
    for root in roots:
        root = str(root)
        if os.path.isfile(root):
            paths = [root]
        else:
            paths = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
        for p in paths:
            with open(p, "rb") as fh:
                out[p] = (os.path.getsize(p), hashlib.sha256(fh.read()).hexdigest())
    return out


def check_case(case: Case, ctx: dict, protected) -> subprocess.CompletedProcess:
    before = snapshot(*protected)
    r = run_cli(case.args(ctx), stdin=case.stdin, env=case.env)
    err = r.stderr.decode("utf-8", "replace")
    out = r.stdout.decode("utf-8", "replace")
    assert r.returncode == case.code, f"{case.name}: exit {r.returncode}, expected {case.code}\n{out[-2000:]}\n{err[-3000:]}"
    assert "Traceback" not in err, f"{case.name}: traceback\n{err[-3000:]}"
    for needle in case.needles:
        needle = needle.format(**ctx)
        assert needle in err, f"{case.name}: {needle!r} not in stderr:\n{err[-3000:]}"
    for needle in case.stdout_needles:
        assert needle.format(**ctx) in out, f"{case.name}: {needle!r} not in stdout:\n{out[-3000:]}"
    after = snapshot(*protected)
    assert after == before, f"{case.name}: inputs or earlier outputs changed: " + \
        str(sorted(set(before.items()) ^ set(after.items()))[:4])
    return r
