"""Run a list of predict/chat calls one after the other in this process: `python predict_jobs.py JOBS.json OUT`.

JOBS.json is [{"name": ..., "kind": "predict"|"chat", "config": YAML, "overrides": ["key=value", ...],
"kwargs": {...}}, ...]. Under msrun every worker runs the same list (each call builds its own mesh and model;
communication groups are created once per process); rank 0 writes OUT/<name>.json: the predict results, or
the chat transcript of this process's stdin (at most one chat job per list: it reads stdin to the end)."""
import io
import json
import os
import sys
import time

from telechat2.infer.distributed import is_lead
from telechat2.infer.predict import chat, predict
from telechat2.train.run_config import load_run_config

jobs, out = json.load(open(sys.argv[1], encoding="utf-8")), sys.argv[2]
for job in jobs:
    start = time.perf_counter()
    cfg = load_run_config(job["config"], job["overrides"])
    if job["kind"] == "predict":
        result = predict(cfg, **job["kwargs"])
    else:
        transcript = io.StringIO()
        chat(cfg, stdin=sys.stdin.buffer, stdout=transcript, **job["kwargs"])
        result = transcript.getvalue()
    if is_lead():
        with open(os.path.join(out, job["name"] + ".json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh, ensure_ascii=False)
    print("DONE", job["name"], f"in {time.perf_counter() - start:.1f} s", flush=True)
