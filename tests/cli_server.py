"""`python -m telechat2 ARGS` without paying the imports each time: one server process imports the CLI and
MindSpore once, then forks a child per command. The child is a fresh process for the command: its own
stdin/stdout/stderr (files), working directory, environment additions and sys.argv; it runs the package's
__main__ exactly as `python -m telechat2` does and exits with its status (an uncaught exception prints its
traceback and exits 1, as the interpreter would). Forking is safe here because the server only imports (no
MindSpore context, device or thread pool is started before the fork).

`run_cli` (bytes, any working directory: the bad-input tables, about 75 commands, ~5 s of imports each) and its
text-mode wrapper `run_telechat2` (every other plain `python -m telechat2` command of the tests)."""
from __future__ import annotations

import atexit
import base64
import json
import os
import subprocess
import sys
import tempfile
import threading

SERVER = r'''
import base64, json, os, runpy, signal, sys, traceback
import mindspore, mindspore.dataset                                     # the imports every command pays
import telechat2.cli, telechat2.train.loop    # noqa: F401
print("READY", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    files = {k: os.path.join(req["dir"], k) for k in ("stdin", "stdout", "stderr")}
    with open(files["stdin"], "wb") as fh:
        fh.write(base64.b64decode(req["stdin"]))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setpgid(0, 0)
            for fd, name, mode in ((0, "stdin", os.O_RDONLY), (1, "stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                   (2, "stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
                new = os.open(files[name], mode, 0o644)
                os.dup2(new, fd)
                os.close(new)
            sys.stdin = open(0, "r", closefd=False)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            sys.argv = ["telechat2"] + [os.fsdecode(base64.b64decode(a)) for a in req["args"]]
            try:
                runpy.run_module("telechat2", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code)
    status = None
    try:
        signal.signal(signal.SIGALRM, lambda *a: os.killpg(pid, signal.SIGKILL))
        signal.alarm(int(req["timeout"]))
        _, status = os.waitpid(pid, 0)
    finally:
        signal.alarm(0)
    code = os.waitstatus_to_exitcode(status)
    print(json.dumps({"code": code}), flush=True)
'''


class CliServer:
    _lock = threading.Lock()
    _proc: subprocess.Popen | None = None

    @classmethod
    def _server(cls, env: dict) -> subprocess.Popen:
        if cls._proc is None or cls._proc.poll() is not None:
            cls._proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True, env=env)
            ready = cls._proc.stdout.readline()
            if ready.strip() != "READY":
                raise RuntimeError(f"the CLI server did not start: {ready!r}")
            atexit.register(cls._proc.kill)
        return cls._proc

    @classmethod
    def run(cls, args, stdin: bytes, env: dict, cwd: str, timeout: float) -> subprocess.CompletedProcess:
        """Like subprocess.run([python, -m, telechat2, *args], capture_output=True) with bytes output."""
        with cls._lock, tempfile.TemporaryDirectory(prefix="telechat2_cli_") as d:
            proc = cls._server({**os.environ, "GLOG_v": "3"})
            req = {"args": [base64.b64encode(os.fsencode(a)).decode() for a in args],
                   "stdin": base64.b64encode(stdin).decode(), "env": env, "cwd": cwd, "dir": d,
                   "timeout": max(1, int(timeout))}
            proc.stdin.write(json.dumps(req) + "\n")
            proc.stdin.flush()
            reply = json.loads(proc.stdout.readline())
            out = {}
            for name in ("stdout", "stderr"):
                with open(os.path.join(d, name), "rb") as fh:
                    out[name] = fh.read()
        return subprocess.CompletedProcess([sys.executable, "-m", "telechat2", *args], reply["code"],
                                           out["stdout"], out["stderr"])


def run_cli(args, stdin: bytes | None = None, env: dict | None = None, cwd: str | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
    """`subprocess.run([python, -m, telechat2, *args], capture_output=True)` with bytes output, forked from the
    server, in the test process's environment plus `env` and in `cwd` (default: the test's working directory).
    Bytes arguments pass non-UTF-8 text through as a shell would."""
    return CliServer.run([a if isinstance(a, bytes) else str(a) for a in args], stdin or b"",
                         {**os.environ, "GLOG_v": "3", **(env or {})}, cwd or os.getcwd(), timeout)


def run_telechat2(args, input: str | None = None, env: dict | None = None,
                  timeout: float = 900) -> subprocess.CompletedProcess:
    """`run_cli` in text mode: like subprocess.run(..., capture_output=True, text=True, input=input)."""
    r = run_cli(args, (input or "").encode(), env, timeout=timeout)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode("utf-8", "replace"),
                                       r.stderr.decode("utf-8", "replace"))
