"""GSM8K-style generation: greedy replies, the last number of the reply against the gold answer.

Prompt (`--prompt-style plain`): k shots "Question: {q}\\nAnswer: {a}\\n\\n" from the dev split, then
"Question: {q}\\nAnswer:"; the reply is cut at the next "Question:". `--prompt-style chat`: the shots and the
question as chat turns (the TeleChat2 template, generation prompt `<_bot>`). Gold: the text after `####`
(GSM8K), else the answer's last number. Numbers compare after removing thousands separators and a trailing
".0" (exact match of the normalised strings).
"""
from __future__ import annotations

import re
import sys

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str:
    t = text.replace(",", "").rstrip(".")
    if "." in t:
        t = t.rstrip("0").rstrip(".")
    return "0" if t in ("-0", "") else t


def last_number(text: str) -> str | None:
    found = NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def gold_answer(answer: str) -> str | None:
    if "####" in answer:
        return last_number(answer.split("####")[-1])
    return last_number(answer)


def plain_prompt(question: str, shots: list[dict]) -> str:
    return "".join(f"Question: {s['question'].strip()}\nAnswer: {s['answer'].strip()}\n\n" for s in shots) + \
        f"Question: {question.strip()}\nAnswer:"


def chat_messages(question: str, shots: list[dict]) -> list[dict]:
    msgs = []
    for s in shots:
        msgs += [{"role": "user", "content": s["question"].strip()}, {"role": "assistant", "content": s["answer"].strip()}]
    return msgs + [{"role": "user", "content": question.strip()}]


def evaluate(model, tokenizer, rows: list[dict], dev: list[dict], shots: int, style: str, batch_size: int,
             max_new_tokens: int, context: int, eos_id: int = 2, pad_id: int = 3) -> dict:
    from tqdm import tqdm
    from ..infer.distributed import is_lead
    from .data import EvalError
    if shots > len(dev):
        raise EvalError(f"--shots {shots}: the dev split has only {len(dev)} examples")
    shot_rows = dev[:shots]
    limit = context - max_new_tokens
    prompts = []
    for r in rows:
        ids = tokenizer.apply_chat_template(chat_messages(r["question"], shot_rows)) if style == "chat" else \
            tokenizer.encode(plain_prompt(r["question"], shot_rows))
        prompts.append(ids[-limit:])                        # keep the end: the question itself
    samples = []
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", file=sys.stderr,
                      disable=len(starts) <= 1 or not is_lead()):
        chunk = prompts[start:start + batch_size]
        seqs = model.generate(chunk, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id,
                              pad_token_id=pad_id, vocab_limit=tokenizer.vocab_size)
        for r, p, seq in zip(rows[start:start + batch_size], chunk, seqs):
            new = list(seq[len(p):])
            if new and new[-1] == eos_id:
                new = new[:-1]
            reply = tokenizer.decode(new)
            if style == "plain":
                reply = reply.split("Question:")[0]
            pred = last_number(reply)
            samples.append({"file": r["file"], "line": r["line"], "gold": r["gold"], "prediction": pred,
                            "correct": pred == r["gold"], "reply": reply})
    correct = sum(s["correct"] for s in samples)
    return {"exact_match": correct / len(samples), "correct": correct, "total": len(samples), "samples": samples}
