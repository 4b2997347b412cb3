"""`telechat2 plan`, `check-config` and `info` on bad input (issue 14): each row is the case, its command,
the exit code (2: argparse refused the option; 1: a named error), the text naming the option/file/key, and
that the inputs are unchanged."""
import os

import pytest

from bad_input import CPU, Case, check_case, run_cli

PRETRAIN = os.path.join(CPU, "pretrain_tiny.yaml")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan_bad")
    (root / "latin1.yaml").write_bytes(b"base_config: " + CPU.encode() + b"/tiny_base.yaml\n# caf\xe9\nrun_mode: train\n")
    (root / "binary.yaml").write_bytes(b"\x00\x01\x02\x03 binary: 1\n")      # UTF-8, but not text
    return {"root": str(root), "latin1": str(root / "latin1.yaml"), "binary": str(root / "binary.yaml")}


def check(*args):
    return lambda c: ["check-config", PRETRAIN, "--devices", "1", *args]


CASES = [
    Case("plan --devices 0", lambda c: ["plan", "--model", "7b", "--devices", "0"], 2,
         ("argument --devices: expected an integer >= 1, got '0'",)),
    Case("plan --devices -3", lambda c: ["plan", "--model", "7b", "--devices", "-3"], 2, ("argument --devices",)),
    Case("plan --devices abc", lambda c: ["plan", "--model", "7b", "--devices", "abc"], 2, ("argument --devices",)),
    Case("plan --hbm-gb nan", lambda c: ["plan", "--model", "7b", "--devices", "8", "--hbm-gb", "nan"], 2,
         ("argument --hbm-gb: expected a finite number > 0, got 'nan'",)),
    Case("plan --seq-length 0", lambda c: ["plan", "--model", "7b", "--devices", "8", "--seq-length", "0"], 2,
         ("argument --seq-length",)),
    Case("check-config --devices 1073741824", lambda c: ["check-config", PRETRAIN, "--devices", "1073741824"], 1,
         ("world size 1073741824",)),
    Case("check-config --peak-tflops inf", check("--peak-tflops", "inf"), 2, ("argument --peak-tflops",)),
    Case("check-config --set lr_schedule.learning_rate=fast", check("--set", "lr_schedule.learning_rate=fast"), 1,
         ("lr_schedule.learning_rate: expected a finite number > 0, got 'fast'",)),
    Case("check-config --set runner_wrapper.use_clip_grad=maybe", check("--set", "runner_wrapper.use_clip_grad=maybe"),
         1, ("runner_wrapper.use_clip_grad: expected True or False, got 'maybe'",)),
    Case("check-config --set context.mode=7", check("--set", "context.mode=7"), 1,
         ("context.mode: expected an integer >= 0 and <= 1, got 7",)),
    Case("check-config --set optimizer.eps=nan", check("--set", "optimizer.eps=nan"), 1, ("optimizer.eps",)),
    Case("check-config of a Latin-1 YAML", lambda c: ["check-config", c["latin1"], "--devices", "1"], 1,
         ("{latin1}: line 2: not UTF-8 text (byte 0xe9",)),
    Case("check-config of a binary file", lambda c: ["check-config", c["binary"], "--devices", "1"], 1,
         ("{binary}: line 1: not a text YAML file",)),
    Case("info of a Latin-1 YAML", lambda c: ["info", "--config", c["latin1"]], 1, ("{latin1}: line 2: not UTF-8",)),
    Case("info of a binary YAML", lambda c: ["info", "--config", c["binary"]], 1, ("{binary}: line 1",)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_plan_bad_input(case, ctx):
    check_case(case, ctx, [ctx["root"], PRETRAIN])


def test_plan_answers_any_device_count():
    """Device counts with many divisors (2^30) or none (a prime): the layouts are found from the divisors
    (trial division up to sqrt(n)), so the candidate set stays small."""
    from telechat2.plan.search import _divisors, candidates, planning_config
    for devices in ("1073741824", "1000000007"):         # 2^30 and a prime
        r = run_cli(["plan", "--model", "7b", "--devices", devices, "--top", "3"])
        assert r.returncode == 0, r.stderr.decode()
        assert b"valid layouts" in r.stdout
    assert _divisors(2**30) == [2**k for k in range(31)] and _divisors(1000000007) == [1, 1000000007]
    assert _divisors(2**30, 32) == [1, 2, 4, 8, 16, 32]
    c = planning_config("7b", 4096)
    assert sum(1 for _ in candidates(c, 1000000007, 4096, global_batch=1000000007)) == 6     # dp = the prime
    assert sum(1 for _ in candidates(c, 2**30, 4096, global_batch=2**30)) < 10_000
