"""Run train / eval / predict calls one after the other in this process: `python lora_jobs.py JOBS.json OUT`.

JOBS.json is [{"name": ..., "kind": "train"|"eval"|"predict", "config": YAML, "overrides": ["key=value", ...],
"kwargs": {...}}, ...] (eval kwargs: task, data and the keywords of `run_eval`). Under msrun every worker runs the
same list (one cluster start for a LoRA run and the inference that uses its adapter); rank 0 writes
OUT/<name>.json with the eval result or the predict results."""
import json
import os
import sys

from telechat2.eval.run import run_eval
from telechat2.infer.distributed import is_lead
from telechat2.infer.predict import predict
from telechat2.train.loop import train
from telechat2.train.run_config import load_run_config

jobs, out = json.load(open(sys.argv[1], encoding="utf-8")), sys.argv[2]
for job in jobs:
    cfg = load_run_config(job["config"], job["overrides"])
    kwargs = dict(job.get("kwargs") or {})
    if job["kind"] == "train":
        result = train(cfg, progress=False)
    elif job["kind"] == "eval":
        result = run_eval(cfg, kwargs.pop("task"), kwargs.pop("data"), **kwargs)
    else:
        result = predict(cfg, **kwargs)
    if is_lead():
        with open(os.path.join(out, job["name"] + ".json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh, ensure_ascii=False)
    print("DONE", job["name"], flush=True)
