"""Train a list of runs one after the other in this process: `python train_jobs.py JOBS.json`, where JOBS.json
is [{"config": YAML, "overrides": ["key=value", ...]}, ...]. Under msrun every worker runs the same list
(each run builds its own mesh, model and compiled step; communication groups are created once per process).

A job may name `"copy_from": DIR`: before it trains, rank 0 copies DIR (an earlier job's output) to the job's
output_dir and every rank waits for it, so a later job can resume a copy of an earlier one's run
(`resume_training=True` among its overrides) while the earlier run's folder stays as it was."""
import json
import os
import shutil
import sys
import time

from telechat2.train.loop import train
from telechat2.train.run_config import load_run_config

for k, job in enumerate(json.load(open(sys.argv[1], encoding="utf-8"))):
    start = time.perf_counter()
    cfg = load_run_config(job["config"], job["overrides"])
    if job.get("copy_from"):
        assert k > 0, "copy_from needs an earlier job in the list (it joined the msrun world)"
        from mindspore.communication import get_group_size, get_rank
        if get_rank() == 0:
            shutil.copytree(job["copy_from"], cfg["output_dir"] + ".copying")
            os.rename(cfg["output_dir"] + ".copying", cfg["output_dir"])
        if get_group_size() > 1:
            from mindspore.mint.distributed import barrier
            barrier()
    train(cfg, progress=False)
    print("TRAINED", job["config"], f"in {time.perf_counter() - start:.1f} s", flush=True)
