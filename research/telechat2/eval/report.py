"""Results as JSON (everything, per-question samples included) and Markdown (the tables a README quotes)."""
from __future__ import annotations

import json
import os
import tempfile

from ..ownership import check_output_file
from .data import EvalError


def markdown_path(output: str) -> str:
    return os.path.splitext(output)[0] + ".md"


def check_output(output: str | None, force: bool, inputs) -> None:
    """--output is a .json file we may write (never a folder, never an input); its .md beside it."""
    if not output:
        return
    if not output.endswith(".json"):
        raise EvalError(f"--output {output}: give a .json file name (the Markdown goes beside it as .md)")
    for path in (output, markdown_path(output)):
        check_output_file(path, force, inputs)


def markdown(result: dict) -> str:
    task = result["task"]
    head = f"## telechat2 eval {task}\n\ncheckpoint `{result['checkpoint']}`" + \
        (f" + adapter `{result['adapter']}`" if result.get("adapter") else "") + f", data `{result['data']}`"
    if task == "perplexity":
        return (head + "\n\n| tokens | samples | mean loss | perplexity | bits/token |\n|---:|---:|---:|---:|---:|\n"
                f"| {result['tokens']} | {result['samples']} | {result['mean_loss']:.4f} | {result['perplexity']:.4f} "
                f"| {result['bits_per_token']:.4f} |\n")
    if task == "choice":
        lines = [head + f", {result['shots']}-shot ({result['language']})", "",
                 "| subject | correct | total | accuracy |", "|---|---:|---:|---:|"]
        lines += [f"| {s} | {v['correct']} | {v['total']} | {100 * v['accuracy']:.2f} |"
                  for s, v in result["subjects"].items()]
        lines += [f"| **overall** | {result['correct']} | {result['total']} | **{100 * result['accuracy']:.2f}** |",
                  "", f"mean over subjects: {100 * result['subject_mean_accuracy']:.2f}", ""]
        return "\n".join(lines)
    return (head + f", {result['shots']}-shot ({result['prompt_style']})\n\n| correct | total | exact match |\n"
            f"|---:|---:|---:|\n| {result['correct']} | {result['total']} | {100 * result['exact_match']:.2f} |\n")


def _write_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".eval-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise EvalError(f"--output {path}: cannot write: {e.strerror or e}") from None


def write(result: dict, output: str) -> None:
    _write_atomic(output, json.dumps(result, ensure_ascii=False, indent=1) + "\n")
    _write_atomic(markdown_path(output), markdown(result))
