"""`telechat2 eval`: multiple-choice accuracy equals an independent log-likelihood computation with the torch
reference, perplexity equals exp(mean training loss), GSM8K-style extraction, the CLI, bad inputs refused."""
import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from bad_input import Case, check_case
from helpers import write_hf_folder
from reference import telechat2_torch as ref
from telechat2.cli import main
from telechat2.eval.generation import gold_answer, last_number
from telechat2.eval.run import run_eval
from telechat2.tokenizer import TeleChat2Tokenizer
from telechat2.train.run_config import load_run_config, model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREDICT = os.path.join(REPO, "configs", "cpu", "predict_tiny.yaml")
TOKENIZER = os.path.join(REPO, "configs", "cpu", "tokenizer", "tokenizer.model")
PRETRAIN = os.path.join(REPO, "configs", "cpu", "data", "pretrain.jsonl")
HEADER = ["id", "question", "A", "B", "C", "D", "answer"]


def write_csv(path, rows, header=HEADER):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A random tiny checkpoint in the layout predict_tiny.yaml describes, and a small C-Eval-style set."""
    root = tmp_path_factory.mktemp("eval")
    cfg = load_run_config(PREDICT)
    mcfg = model_config(cfg)
    sd = ref.random_state_dict(mcfg.to_hf_dict(), seed=5, std=0.08)
    ckpt = write_hf_folder(str(root / "ckpt"), mcfg, sd)
    test, dev = root / "test", root / "dev"
    test.mkdir(), dev.mkdir()
    rs = np.random.RandomState(0)
    words = ["apple", "river", "seven", "Beijing", "blue", "42", "tea", "train", "moon", "北京", "猫", "水"]
    for subject in ("geography", "basic_math"):
        def q(i):
            picks = rs.choice(words, 5, replace=False)
            return [i, f"Which one is {picks[0]} ({subject} {i})?", *picks[1:], "ABCD"[rs.randint(4)]]
        write_csv(test / f"{subject}_test.csv", [q(i) for i in range(4)])
        write_csv(dev / f"{subject}_dev.csv", [q(i) for i in range(2)])
    return {"cfg": cfg, "mcfg": mcfg, "sd": sd, "ckpt": ckpt, "root": root, "test": str(test), "dev": str(dev),
            "tok": TeleChat2Tokenizer(TOKENIZER)}


def reference_loglik(env, prompt: str, continuation: str) -> float:
    """sum log p(continuation | prompt) with the torch reference (continuation tokens: encode(whole) after the
    prompt's tokens)."""
    tok = env["tok"]
    ctx, whole = tok.encode(prompt), tok.encode(prompt + continuation)
    cont = whole[len(ctx):]
    with torch.no_grad():
        logits = ref.forward(env["sd"], env["mcfg"].to_hf_dict(), torch.tensor([whole[:-1]]))[0]
    logp = torch.log_softmax(logits.double(), -1)
    return float(sum(logp[len(whole) - 1 - len(cont) + k, t] for k, t in enumerate(cont)))


def mmlu_prompt(subject, shots, row):
    """The MMLU prompt of lm-evaluation-harness, written out independently of telechat2.eval.choice."""
    def block(r, answer):
        text = f"{r[1]}\nA. {r[2]}\nB. {r[3]}\nC. {r[4]}\nD. {r[5]}\nAnswer:"
        return text + (f" {r[6]}" if answer else "")
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return head + "\n\n".join([block(s, True) for s in shots] + [block(row, False)])


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))[1:]


def test_choice_accuracy_equals_reference_logliks(env):
    res = run_eval(env["cfg"], "choice", env["test"], checkpoint=env["ckpt"], dev=env["dev"], shots=1,
                   batch_size=3)
    samples = {(s["subject"], s["line"]): s for s in res["samples"]}
    correct, per = 0, {}
    for subject in ("basic_math", "geography"):
        shots = read_rows(os.path.join(env["dev"], f"{subject}_dev.csv"))[:1]
        for i, row in enumerate(read_rows(os.path.join(env["test"], f"{subject}_test.csv"))):
            ll = [reference_loglik(env, mmlu_prompt(subject, shots, row), f" {c}") for c in "ABCD"]
            s = samples[(subject, i + 2)]                  # line 1 is the header
            np.testing.assert_allclose(s["loglikelihoods"], ll, atol=2e-4)
            best = int(np.argmax(ll))
            assert sorted(ll)[-1] - sorted(ll)[-2] > 1e-3, "choices too close to decide the argmax"
            assert s["prediction"] == "ABCD"[best] and s["answer"] == row[6]
            ok = "ABCD"[best] == row[6]
            correct += ok
            per.setdefault(subject, []).append(ok)
    assert res["correct"] == correct and res["total"] == 8 and res["accuracy"] == correct / 8
    for subject, oks in per.items():
        assert res["subjects"][subject]["accuracy"] == sum(oks) / len(oks)
    # batching does not change the scores
    res1 = run_eval(env["cfg"], "choice", env["test"], checkpoint=env["ckpt"], dev=env["dev"], shots=1, batch_size=8)
    np.testing.assert_allclose([s["loglikelihoods"] for s in res1["samples"]],
                               [s["loglikelihoods"] for s in res["samples"]], atol=1e-5)


def test_choice_jsonl_and_headerless_mmlu_csv(env, tmp_path):
    rows = read_rows(os.path.join(env["test"], "geography_test.csv"))
    path = tmp_path / "geo.jsonl"
    path.write_text("".join(json.dumps({"question": r[1], "choices": r[2:6], "answer": "ABCD".index(r[6]),
                                        "subject": "geography"}) + "\n" for r in rows))
    mmlu = write_csv(tmp_path / "geography_test.csv", [r[1:] for r in rows], header=None)
    a = run_eval(env["cfg"], "choice", str(path), checkpoint=env["ckpt"])
    b = run_eval(env["cfg"], "choice", mmlu, checkpoint=env["ckpt"])
    assert [s["prediction"] for s in a["samples"]] == [s["prediction"] for s in b["samples"]]
    np.testing.assert_allclose([s["loglikelihoods"] for s in a["samples"]],
                               [s["loglikelihoods"] for s in b["samples"]], atol=1e-6)
    for s, r in zip(b["samples"], rows):         # 0-shot against the reference too
        ll = [reference_loglik(env, mmlu_prompt("geography", [], [None, *r[1:]]), f" {c}") for c in "ABCD"]
        np.testing.assert_allclose(s["loglikelihoods"], ll, atol=2e-4)


def test_perplexity_equals_exp_of_the_training_loss(env, tmp_path):
    import mindspore as ms
    from telechat2 import TeleChat2ForCausalLM
    from telechat2.checkpoint.load import load_weights
    from telechat2.data.loader import DataLoader
    docs = tmp_path / "docs.jsonl"
    with open(PRETRAIN, encoding="utf-8") as fh:
        docs.write_text("".join(fh.readlines()[:12]), encoding="utf-8")
    seq = env["mcfg"].seq_length
    data = str(tmp_path / "mr")
    assert main(["preprocess", "pretrain", "--input", str(docs), "--tokenizer", TOKENIZER, "--seq-length",
                 str(seq), "--output", data, "--workers", "0", "--no-progress", "--reset-position-ids",
                 "--reset-attention-mask"]) == 0
    res = run_eval(env["cfg"], "perplexity", data, checkpoint=env["ckpt"], batch_size=2)
    # the training loss, sample by sample, with the trainer's host-built attention inputs of packed documents
    model = TeleChat2ForCausalLM(env["mcfg"])
    load_weights(model, env["ckpt"])
    total, count = 0.0, 0
    for b in DataLoader(data, 1, shuffle=False):
        ids, targets = b["input_ids"][:, :-1], b["input_ids"][:, 1:]
        attn = model.attention_inputs(seq, b["position_ids"][:, :-1], b["segment_ids"][:, :-1])
        loss = float(model.next_token_loss(ms.Tensor(ids), ms.Tensor(targets), *attn).asnumpy())
        total += loss * targets.size
        count += targets.size
    assert res["tokens"] == count and res["samples"] == count // seq
    assert abs(res["perplexity"] - math.exp(total / count)) < 1e-4 * res["perplexity"]
    # the jsonl itself: every token of the stream but the first, windows of seq, against the torch reference
    res_j = run_eval(env["cfg"], "perplexity", str(docs), checkpoint=env["ckpt"], batch_size=4)
    tok = env["tok"]
    stream = []
    with open(docs, encoding="utf-8") as fh:
        for line in fh:
            stream += tok.encode(json.loads(line)["text"]) + [2]
    nll = 0.0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, seq):
            w = torch.tensor([stream[start:start + seq + 1]])
            logits = ref.forward(env["sd"], env["mcfg"].to_hf_dict(), w[:, :-1])
            nll += float(torch.nn.functional.cross_entropy(logits[0].double(), w[0, 1:], reduction="sum"))
    assert res_j["tokens"] == len(stream) - 1
    assert abs(res_j["mean_loss"] - nll / (len(stream) - 1)) < 1e-5


def test_number_extraction():
    assert gold_answer("He has 3 + 4 = 7 apples.\n#### 1,234") == "1234"
    assert gold_answer("42") == "42" and gold_answer("none") is None
    assert last_number("So 5 apples cost $12.50, the answer is 12.50.") == "12.5"
    assert last_number("-3.0 degrees") == "-3" and last_number("no digits") is None


class ScriptedModel:
    """generate() returns each prompt followed by a fixed reply: the extraction path end to end."""
    def __init__(self, tok, replies):
        self.tok, self.replies, self.prompts = tok, replies, []

    def generate(self, prompts, max_new_tokens, **kw):
        out = []
        for p in prompts:
            self.prompts.append(list(p))
            out.append(list(p) + self.tok.encode(self.replies[len(self.prompts) - 1])[:max_new_tokens] + [2])
        return out


def test_generation_exact_match_with_shots(env, tmp_path):
    from telechat2.eval.data import read_qa_set
    from telechat2.eval.generation import evaluate, plain_prompt
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(x) + "\n" for x in [
        {"question": "2+3?", "answer": "2+3=5\n#### 5"}, {"question": "10*10?", "answer": "#### 100"},
        {"question": "1000+234?", "answer": 1234}]))
    rows = read_qa_set(str(qa))
    fake = ScriptedModel(env["tok"], ["It is 5.", "The result is 99.\n\nQuestion: 100", "1,234"])
    res = evaluate(fake, env["tok"], rows, rows[:1], 1, "plain", 2, 16, 256)
    assert [s["prediction"] for s in res["samples"]] == ["5", "99", "1234"]     # cut at the next "Question:"
    assert res["correct"] == 2 and res["exact_match"] == 2 / 3
    assert fake.prompts[1] == env["tok"].encode(plain_prompt("10*10?", rows[:1]))
    # the real model: the reply is what model.generate gives for the same prompt
    real = run_eval(env["cfg"], "generate", str(qa), checkpoint=env["ckpt"], max_new_tokens=6, batch_size=2)
    assert real["total"] == 3 and all(s["prediction"] == last_number(s["reply"]) for s in real["samples"])


def test_cli_choice_writes_json_and_markdown(env, tmp_path):
    out = tmp_path / "res.json"
    r = check_case(Case("cli", lambda c: ["eval", "choice", "--config", PREDICT, "--checkpoint", env["ckpt"],
                                          "--data", env["test"], "--dev", env["dev"], "--shots", "1",
                                          "--batch-size", "4", "--output", str(out)], 0), {}, [env["test"]])
    res = json.loads(out.read_text())
    api = run_eval(env["cfg"], "choice", env["test"], checkpoint=env["ckpt"], dev=env["dev"], shots=1)
    assert [s["prediction"] for s in res["samples"]] == [s["prediction"] for s in api["samples"]]
    md = (tmp_path / "res.md").read_text()
    assert "| geography |" in md and "**overall**" in md and "| **overall** |" in r.stdout.decode()
    assert "choice" in r.stderr.decode()                       # the tqdm bar
    check_case(Case("exists", lambda c: ["eval", "choice", "--config", PREDICT, "--checkpoint", env["ckpt"],
                                              "--data", env["test"], "--output", str(out)], 1,
                         ("exists; pass --force",)), {}, [env["test"], str(out)])


BAD = [
    ("missing column", "t_test.csv", "id,question,A,B,C,D\n1,q,a,b,c,d\n", "t_test.csv:1: missing column(s) answer"),
    ("bad answer", "t_test.csv", "id,question,A,B,C,D,answer\n1,q,a,b,c,d,A\n2,q,a,b,c,d,E\n",
     "t_test.csv:3: answer 'E' is not one of A, B, C, D"),
    ("bad json", "t.jsonl", '{"question": "q", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "A"}\n{oops\n',
     "t.jsonl:2: invalid JSON"),
    ("jsonl missing keys", "t.jsonl", '{"question": "q", "A": "a", "answer": "B"}\n', "t.jsonl:1: missing B, C, D"),
    ("not utf-8", "t_test.csv", b"id,question,A,B,C,D,answer\n1,q\xff,a,b,c,d,A\n", "t_test.csv:2: not UTF-8"),
]


@pytest.mark.parametrize("name,fname,content,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_choice_files_named(env, tmp_path, capsys, name, fname, content, needle):
    p = tmp_path / fname
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["eval", "choice", "--config", PREDICT, "--checkpoint", env["ckpt"], "--data", str(p)]) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err


def test_bad_options_and_files_refused(env, tmp_path, capsys):
    base = ["--config", PREDICT, "--checkpoint", env["ckpt"]]
    cases = [
        (["eval", "choice", *base, "--data", env["test"], "--shots", "1"], "--shots 1 needs --dev"),
        (["eval", "choice", *base, "--data", env["test"], "--dev", env["dev"], "--shots", "3"],
         "the dev split has only 2 for subject 'basic_math'"),
        (["eval", "choice", *base, "--data", str(tmp_path / "nope.csv")], "nope.csv: no such file or folder"),
        (["eval", "perplexity", *base, "--data", str(tmp_path / "p.jsonl")], "p.jsonl:2: no 'text'"),
        (["eval", "generate", *base, "--data", str(tmp_path / "g.jsonl")], "g.jsonl:1: missing answer"),
        (["eval", "choice", *base, "--data", env["test"], "--output", str(tmp_path / "r.txt")], "give a .json"),
    ]
    (tmp_path / "p.jsonl").write_text('{"text": "hello"}\n{"txt": "x"}\n')
    (tmp_path / "g.jsonl").write_text('{"question": "1+1?"}\n')
    for argv, needle in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (argv, err)
    with pytest.raises(SystemExit) as e:                     # numeric options: the shared parser, exit 2
        main(["eval", "choice", *base, "--data", env["test"], "--shots", "-1"])
    assert e.value.code == 2 and "--shots" in capsys.readouterr().err
