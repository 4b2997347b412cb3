"""Train a list of runs one after the other in this process: `python train_jobs.py JOBS.json`, where JOBS.json
is [{"config": YAML, "overrides": ["key=value", ...]}, ...]. Under msrun every worker runs the same list
(each run builds its own mesh, model and compiled step; communication groups are created once per process)."""
import json
import sys
import time

from telechat2.train.loop import train
from telechat2.train.run_config import load_run_config

for job in json.load(open(sys.argv[1], encoding="utf-8")):
    start = time.perf_counter()
    train(load_run_config(job["config"], job["overrides"]), progress=False)
    print("TRAINED", job["config"], f"in {time.perf_counter() - start:.1f} s", flush=True)
