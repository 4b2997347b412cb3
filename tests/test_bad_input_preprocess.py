"""`telechat2 preprocess` on bad input (issue 14): each row is the case, its command, the exit code, the text
naming the option/file, and that no input or earlier output changed."""
import os
import shutil

import pytest

from bad_input import CPU, TOKENIZER, Case, check_case

PRETRAIN = os.path.join(CPU, "data", "pretrain.jsonl")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre_bad")
    (root / "d").mkdir()
    shutil.copy(PRETRAIN, root / "d" / "input.jsonl")
    (root / "unowned").mkdir()
    (root / "unowned" / "notes.txt").write_text("mine")
    return {"root": str(root), "d": str(root / "d"), "input": str(root / "d" / "input.jsonl"),
            "unowned": str(root / "unowned")}


def pre(inp, output, *extra):
    return ["preprocess", "pretrain", "--input", inp, "--tokenizer", TOKENIZER, "--seq-length", "16",
            "--output", output, "--no-progress", *extra]


CASES = [
    Case("--force with the input inside the output", lambda c: pre(c["input"], c["d"], "--force"), 1,
         ("--output {d} contains the input --input {input}",)),
    Case("--force with the output being the input", lambda c: pre(c["input"], c["input"], "--force"), 1,
         ("--output {input} is the input --input",)),
    Case("--force with the tokenizer inside the output", lambda c: pre(c["input"], CPU, "--force"), 1,
         ("contains the input",)),
    Case("--force into a folder telechat2 did not write", lambda c: pre(c["input"], c["unowned"], "--force"), 1,
         ("--output {unowned} was not written by telechat2",)),
    Case("--workers -3", lambda c: pre(c["input"], c["root"] + "/o1", "--workers", "-3"), 2,
         ("argument --workers: expected an integer >= 0, got '-3'",)),
    Case("--seq-length 0", lambda c: pre(c["input"], c["root"] + "/o2")[:-3] + ["--seq-length", "0", "--output",
                                                                              c["root"] + "/o2"], 2,
         ("argument --seq-length",)),
    Case("--vocab-size 5", lambda c: pre(c["input"], c["root"] + "/o3", "--vocab-size", "5"), 2,
         ("argument --vocab-size: expected an integer >= 13",)),
    Case("--seed nan", lambda c: pre(c["input"], c["root"] + "/o4", "--seed", "nan"), 2, ("argument --seed",)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_preprocess_bad_input(case, ctx):
    check_case(case, ctx, [ctx["root"], os.path.join(CPU, "tokenizer")])


def test_force_replaces_only_our_own_output(ctx, tmp_path):
    from bad_input import run_cli
    out = tmp_path / "out"
    assert run_cli(pre(ctx["input"], str(out))).returncode == 0
    assert (out / ".telechat2-output.json").exists()
    r = run_cli(pre(ctx["input"], str(out), "--force"))
    assert r.returncode == 0, r.stderr.decode()
    assert sorted(os.listdir(tmp_path)) == ["out"]
