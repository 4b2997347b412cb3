"""Multiple-choice accuracy by log-likelihood, as lm-evaluation-harness computes `acc` for MMLU-style tasks.

Prompt (`--language en`, MMLU): "The following are multiple choice questions (with answers) about {subject}.
\\n\\n" + k shots + the question, each shot/question "{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:"
(a shot followed by " {letter}"), joined by "\\n\\n". `--language zh` (C-Eval/CMMLU): the description
"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\\n\\n" and "答案：". Shots are the first k dev
questions of the same subject.

Each choice's continuation is " {letter}"; its score is sum_t log p(continuation_t | prompt, continuation_<t),
with the continuation's tokens those of encode(prompt + continuation) after the first len(encode(prompt))
(the split lm-evaluation-harness uses). A prompt too long for the context loses tokens from the left.
The prediction is the argmax (first on ties); accuracy per subject and overall (micro: over all questions;
the unweighted mean over subjects is reported too).
"""
from __future__ import annotations

from collections import defaultdict

from .data import EvalError

TEMPLATES = {
    "en": ("The following are multiple choice questions (with answers) about {subject}.\n\n", "Answer:"),
    "zh": ("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "答案："),
}


def format_question(row: dict, answer_word: str, with_answer: bool) -> str:
    lines = [row["question"].strip()]
    lines += [f"{'ABCDEFGHIJ'[i]}. {c}" for i, c in enumerate(row["choices"])]
    text = "\n".join(lines) + "\n" + answer_word
    return text + (" " + "ABCDEFGHIJ"[row["answer"]] if with_answer else "")


def shots_by_subject(dev: list[dict], subjects, k: int) -> dict:
    by = defaultdict(list)
    for r in dev:
        by[r["subject"]].append(r)
    out = {}
    for s in subjects:
        if len(by[s]) < k:
            have = f"only {len(by[s])}" if by[s] else "none"
            raise EvalError(f"--shots {k}: the dev split has {have} for subject {s!r} "
                            f"(dev subjects: {', '.join(sorted(by)) or 'none'})")
        out[s] = by[s][:k]
    return out


def build_prompt(row: dict, shots: list[dict], language: str) -> str:
    description, answer_word = TEMPLATES[language]
    parts = [format_question(s, answer_word, True) for s in shots] + [format_question(row, answer_word, False)]
    return description.format(subject=row["subject"].replace("_", " ")) + "\n\n".join(parts)


def requests_of(tokenizer, prompt: str, n_choices: int, seq_length: int) -> list[tuple[list[int], list[int]]]:
    """Per choice, the (input_ids, targets) row of prompt + " {letter}" (targets -100 outside the letter)."""
    context = tokenizer.encode(prompt)
    rows = []
    for letter in "ABCDEFGHIJ"[:n_choices]:
        whole = tokenizer.encode(prompt + " " + letter)
        cont = whole[len(context):]
        if not cont:
            raise EvalError(f"the continuation {' ' + letter!r} gives no tokens after the prompt")
        whole = whole[-(seq_length + 1):]                 # left-truncate to the context
        inputs, targets = whole[:-1], whole[1:]
        n = len(targets)
        targets = [-100] * (n - len(cont)) + targets[n - len(cont):]
        rows.append((inputs, targets))
    return rows


def evaluate(model, tokenizer, rows: list[dict], dev: list[dict], shots: int, language: str, batch_size: int,
             seq_length: int, pad_id: int = 3) -> dict:
    from .scoring import token_nlls
    subjects = sorted({r["subject"] for r in rows})
    shot_rows = shots_by_subject(dev, subjects, shots) if shots else {s: [] for s in subjects}
    requests, owner = [], []
    for qi, r in enumerate(rows):
        prompt = build_prompt(r, shot_rows[r["subject"]], language)
        for ci, req in enumerate(requests_of(tokenizer, prompt, len(r["choices"]), seq_length)):
            requests.append(req)
            owner.append((qi, ci))
    nlls = token_nlls(model, requests, batch_size, pad_id, desc="choice")
    loglik = [[0.0] * len(r["choices"]) for r in rows]
    for (qi, ci), nll in zip(owner, nlls):
        loglik[qi][ci] = -float(nll.astype("float64").sum())
    samples, per = [], defaultdict(lambda: [0, 0])
    for r, ll in zip(rows, loglik):
        pred = max(range(len(ll)), key=lambda i: ll[i])       # first index on ties
        ok = pred == r["answer"]
        per[r["subject"]][0] += ok
        per[r["subject"]][1] += 1
        samples.append({"file": r["file"], "line": r["line"], "subject": r["subject"], "answer": "ABCDEFGHIJ"[r["answer"]],
                        "prediction": "ABCDEFGHIJ"[pred], "correct": ok, "loglikelihoods": ll})
    by_subject = {s: {"accuracy": c / n, "correct": c, "total": n} for s, (c, n) in sorted(per.items())}
    correct = sum(v["correct"] for v in by_subject.values())
    return {"accuracy": correct / len(rows), "correct": correct, "total": len(rows),
            "subject_mean_accuracy": sum(v["accuracy"] for v in by_subject.values()) / len(by_subject),
            "subjects": by_subject, "samples": samples}
