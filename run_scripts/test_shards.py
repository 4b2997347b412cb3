"""The test entry point behind run_scripts/test.sh: `python run_scripts/test_shards.py [PYTEST ARGS]`.

Without a test path among the arguments the whole suite runs as SHARDS pytest processes side by side, each on
its share of the test files, with the arguments given to each: most tests are one single-threaded MindSpore
process, so one pytest leaves a core of this 2-core machine idle for much of the suite. The files are dealt to
the shards longest first by COST (so that the shards end together). Every test that launches msrun holds the
lock file this script names in TELECHAT2_MSRUN_LOCK (tests/dist_util.py: msrun_slot): shared by jobs of up
to 4 workers, exclusive for larger ones, which never run beside another msrun job. Each shard prints its lines
prefixed with its number; the exit status is the first non-zero one. With a test path
(`tests/test_x.py`, `tests/test_x.py::test_y`) it is one plain pytest.
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDS = 2
# approximate seconds of a file's tests in one pytest on this machine; files not listed cost DEFAULT_COST. Only
# the balance of the shards depends on these numbers.
COST = {"test_ascend_configs.py": 700, "test_parallel.py": 480, "test_train.py": 170, "test_generate_parallel.py": 125,
        "test_moe_parallel.py": 250, "test_ring_attention.py": 50, "test_lora_run.py": 45,
        "test_bad_input_train.py": 40, "test_launcher.py": 35, "test_plan.py": 25, "test_quantize.py": 20}
DEFAULT_COST = 15


def names_a_test(arg: str) -> bool:
    return not arg.startswith("-") and ("::" in arg or os.path.exists(arg))


def cost(path: str) -> int:
    return COST.get(os.path.basename(path), DEFAULT_COST)


def deal(files: list[str], shards: int) -> list[list[str]]:
    """Longest first, each file to the shard with the least cost so far. The first shard then runs its files
    longest first, the others shortest first: the long files are the msrun-heavy ones, so while one shard runs
    its msrun jobs (the 8-worker one alone) the other has single-process tests to run."""
    parts, load = [[] for _ in range(shards)], [0] * shards
    for f in sorted(files, key=lambda f: -cost(f)):
        k = load.index(min(load))
        parts[k].append(f)
        load[k] += cost(f)
    return [part if k == 0 else part[::-1] for k, part in enumerate(parts)]


def combined_status(codes: list[int]) -> int:
    """The suite's exit status: the first failing shard's. pytest's 5 (no test of that shard was selected, by -k
    or -m) is not a failure unless no shard selected one."""
    if not all(c == 5 for c in codes):
        codes = [0 if c == 5 else c for c in codes]
    return next((c for c in codes if c), 0)


def main(args: list[str]) -> int:
    os.chdir(REPO)
    pytest = [sys.executable, "-m", "pytest"]
    if any(names_a_test(a) for a in args):
        return subprocess.call([*pytest, "--durations=20", *args])
    parts = deal(sorted(glob.glob(os.path.join("tests", "test_*.py"))), SHARDS)
    root = tempfile.mkdtemp(prefix="telechat2-tests-")
    env = {**os.environ, "TELECHAT2_MSRUN_LOCK": os.path.join(root, "msrun.lock")}
    procs, lock = [], threading.Lock()
    start = time.perf_counter()
    ended: dict[int, float] = {}

    def relay(k, proc):
        for line in proc.stdout:
            with lock:
                sys.stdout.write(f"[{k}] {line}")
                sys.stdout.flush()
        proc.wait()
        ended[k] = time.perf_counter() - start

    for k, files in enumerate(parts, 1):
        print(f"[{k}] {len(files)} files: {' '.join(os.path.basename(f) for f in files)}", flush=True)
        # each shard its own pytest temp root (pytest clears --basetemp when it starts)
        cmd = [*pytest, "--durations=10", f"--basetemp={os.path.join(root, f'shard{k}')}", *args, *files]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      errors="replace", start_new_session=True, env=env))
    relays = [threading.Thread(target=relay, args=(k, p), daemon=True) for k, p in enumerate(procs, 1)]
    for t in relays:
        t.start()
    try:
        for t in relays:
            t.join()
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        return 130
    codes = [p.returncode for p in procs]
    status = combined_status(codes)
    for k, code in enumerate(codes, 1):
        print(f"[{k}] exit {code} after {ended[k]:.0f} s", flush=True)
    print(f"suite: {SHARDS} shards in {time.perf_counter() - start:.0f} s, "
          f"{'FAILED' if status else 'passed'}", flush=True)
    if not status:
        shutil.rmtree(root, ignore_errors=True)     # our own temp root; kept after a failure to look into
    else:
        print(f"test files of the failed run kept in {root}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
