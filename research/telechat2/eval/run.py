"""`telechat2 eval` as a library call: read and check the inputs, then load the model once and score."""
from __future__ import annotations

import time

from .data import EvalError, read_choice_set, read_qa_set


def _setup(cfg: dict, checkpoint: str | None, adapter: str | None):
    from ..infer.predict import load_for_inference
    return load_for_inference(cfg, checkpoint, adapter)


def _ids(cfg: dict) -> tuple[int, int]:
    mc = cfg["model"].get("model_config") or {}
    return int(mc.get("eos_token_id", 2)), int(mc.get("pad_token_id", 3))


def run_eval(cfg: dict, task: str, data: str, *, checkpoint=None, dev=None, shots=0, language="en",
             prompt_style="plain", batch_size=None, max_new_tokens=256, limit=None, output=None, force=False,
             adapter=None) -> dict:
    """The result dict of one task (also written to `output` .json + .md when given, by rank 0 under msrun).

    Under msrun with model_parallel > 1 every rank runs the same batches through the tensor-parallel model
    (`load_for_inference` builds the mesh; generation shares rank 0's prompts), so each rank holds the result."""
    from . import report
    ckpt = checkpoint or cfg.get("load_checkpoint")
    report.check_output(output, force, [("--data", data), ("--dev", dev), ("--checkpoint", ckpt), ("--adapter", adapter)])
    if shots and not dev:
        raise EvalError(f"--shots {shots} needs --dev (the split the examples are taken from)")
    eos_id, pad_id = _ids(cfg)
    bs = batch_size or cfg["runner_config"]["batch_size"]
    # read and check every input before a weight is read
    if task == "choice":
        rows, dev_rows = read_choice_set(data), (read_choice_set(dev) if dev else [])
    elif task == "generate":
        rows, dev_rows = read_qa_set(data), (read_qa_set(dev) if dev else [])
    elif task != "perplexity":
        raise EvalError(f"unknown task {task!r}")
    if task != "perplexity" and limit:
        rows = rows[:limit]
    if task == "choice":
        from .choice import shots_by_subject
        shots_by_subject(dev_rows, sorted({r["subject"] for r in rows}), shots)
    t0 = time.perf_counter()
    model, tokenizer, model_cfg = _setup(cfg, checkpoint, adapter)
    result = {"task": task, "checkpoint": ckpt, "data": data, "model_parallel": model.mesh.tp}
    if adapter:
        result["adapter"] = adapter
    if task == "perplexity":
        from .perplexity import perplexity, read_samples
        samples = read_samples(data, tokenizer, model_cfg.seq_length, pad_id, eos_id)
        if limit:
            samples = samples[:limit]
        result.update(seq_length=model_cfg.seq_length, **perplexity(model, samples, bs))
    elif task == "choice":
        from .choice import evaluate
        result.update(dev=dev, shots=shots, language=language,
                      **evaluate(model, tokenizer, rows, dev_rows, shots, language, bs, model_cfg.seq_length, pad_id))
    else:
        from ..infer.predict import context_length
        from .generation import evaluate
        ctx = context_length(cfg, model_cfg)
        if max_new_tokens >= ctx:
            raise EvalError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the context of {ctx}")
        result.update(dev=dev, shots=shots, prompt_style=prompt_style, max_new_tokens=max_new_tokens,
                      **evaluate(model, tokenizer, rows, dev_rows, shots, prompt_style, bs, max_new_tokens, ctx,
                                 eos_id, pad_id))
    result["seconds"] = time.perf_counter() - t0
    if output and model.mesh.rank == 0:
        report.write(result, output)
    return result
