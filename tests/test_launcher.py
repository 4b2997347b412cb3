"""run_scripts/msrun_launcher.sh (MindFormers' 1/2/6/9-argument forms) and pretrain/finetune/predict.sh:
argument handling through MSRUN_DRY_RUN, and real 2-worker msrun runs on this CPU."""
import json
import os
import shlex
import socket
import subprocess

import pytest

from dist_util import msrun_slot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "run_scripts")
LAUNCHER = os.path.join(SCRIPTS, "msrun_launcher.sh")
VENV_BIN = os.path.join(REPO, ".venv", "bin")
PRETRAIN_TINY = os.path.join(REPO, "configs", "cpu", "pretrain_tiny.yaml")
ENV = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "GLOG_v": "3"}


def run(script, *args, dry=True, env=None, cwd=None, timeout=300):
    e = {**ENV, **(env or {}), **({"MSRUN_DRY_RUN": "1"} if dry else {})}
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, env=e, cwd=cwd or REPO,
                          timeout=timeout)


def msrun_options(stdout: str) -> tuple[dict, list]:
    """The printed msrun command as ({option: value}, [command words])."""
    words = shlex.split(stdout.strip().splitlines()[-1])
    assert words[0] == "msrun"
    i = 1
    while words[i].startswith("--") and "=" in words[i]:
        i += 1
    return dict(w[2:].split("=", 1) for w in words[1:i]), words[i:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEFAULTS = {"worker_num": "8", "local_worker_num": "8", "master_addr": "127.0.0.1", "master_port": "8118",
            "node_rank": "0", "log_dir": "output/msrun_log", "join": "False", "cluster_time_out": "7200"}


@pytest.mark.parametrize("args, expected", [
    ([], {}),
    (["4"], {"worker_num": "4", "local_worker_num": "4"}),
    (["4", "9000", "/tmp/logs", "True", "60"],
     {"worker_num": "4", "local_worker_num": "4", "master_port": "9000", "log_dir": "/tmp/logs", "join": "True",
      "cluster_time_out": "60"}),
    (["16", "8", "10.0.0.1", "8200", "1", "out/log", "False", "300"],
     {"worker_num": "16", "local_worker_num": "8", "master_addr": "10.0.0.1", "master_port": "8200",
      "node_rank": "1", "log_dir": "out/log", "cluster_time_out": "300"}),
])
def test_launcher_argument_forms(args, expected):
    r = run(LAUNCHER, "python -m telechat2 info --preset 7b", *args)
    assert r.returncode == 0, r.stderr
    opts, cmd = msrun_options(r.stdout)
    assert opts == {**DEFAULTS, **expected}
    assert cmd == ["python", "-m", "telechat2", "info", "--preset", "7b"]


@pytest.mark.parametrize("n", [0, 3, 4, 5, 7, 8, 10])
def test_launcher_refuses_other_argument_counts(n):
    args = (["python x.py"] + ["2"] * 9)[:n]
    r = run(LAUNCHER, *args)
    assert r.returncode == 2
    assert f"expected 1, 2, 6 or 9 arguments, got {n}" in r.stderr and "WORKER_NUM" in r.stderr


def test_launcher_refuses_one_worker_with_a_hint():
    r = run(LAUNCHER, "python -m telechat2 train --config c.yaml", "1")
    assert r.returncode == 2
    assert "WORKER_NUM is 1" in r.stderr
    assert "run the command directly: python -m telechat2 train --config c.yaml" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["python x.py", "two"], "WORKER_NUM must be a positive integer"),
    (["python x.py", "2", "80", "log", "True", "60"], "MASTER_PORT must be a port number"),
    (["python x.py", "2", "9000", "log", "yes", "60"], "JOIN must be True or False"),
    (["python x.py", "2", "9000", "log", "True", "soon"], "CLUSTER_TIME_OUT must be an integer"),
    (["python x.py", "4", "8", "10.0.0.1", "9000", "0", "log", "True", "60"], "LOCAL_WORKER 8 > WORKER_NUM 4"),
    (["python x.py", "16", "8", "10.0.0.1", "9000", "2", "log", "True", "60"], "need node ranks 0-1"),
    (["telechat2 info", "2"], "must start with python"),
    (["", "2"], "the command (first argument) is empty"),
])
def test_launcher_bad_arguments(args, message):
    r = run(LAUNCHER, *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_launcher_keeps_quoted_arguments():
    r = run(LAUNCHER, "python -m telechat2 predict --prompt 'hello there' --set a.b=\"x y\"", "2")
    _, cmd = msrun_options(r.stdout)
    assert cmd[-4:] == ["--prompt", "hello there", "--set", "a.b=x y"]


# ---- pretrain.sh / finetune.sh / predict.sh ----------------------------------------------------------------

def test_run_scripts_take_the_world_size_from_the_config():
    r = run(os.path.join(SCRIPTS, "finetune.sh"), "configs/ascend/finetune_35b_o1.yaml", "--train-dataset", "d")
    assert r.returncode == 0, r.stderr
    opts, cmd = msrun_options(r.stdout)
    assert opts["worker_num"] == "16" and opts["local_worker_num"] == "8" and opts["join"] == "True"
    assert cmd == ["python", "-m", "telechat2", "train", "--config",
                   os.path.join(REPO, "configs", "ascend", "finetune_35b_o1.yaml"), "--train-dataset", "d"]


def test_run_scripts_multi_node_by_arguments_and_by_environment(tmp_path):
    cfg = "configs/ascend/pretrain_115b_o1.yaml"
    by_args = run(os.path.join(SCRIPTS, "pretrain.sh"), cfg, "512", "8", "192.168.1.1", "8300", "5", "--resume")
    by_env = run(os.path.join(SCRIPTS, "pretrain.sh"), cfg, "--resume",
                 env={"MASTER_ADDR": "192.168.1.1", "MASTER_PORT": "8300", "NODE_RANK": "5", "LOG_DIR": "L"})
    for r in (by_args, by_env):
        assert r.returncode == 0, r.stderr
        opts, cmd = msrun_options(r.stdout)
        assert (opts["worker_num"], opts["local_worker_num"], opts["master_addr"], opts["master_port"],
                opts["node_rank"]) == ("512", "8", "192.168.1.1", "8300", "5")
        assert cmd[-1] == "--resume"
    assert msrun_options(by_env.stdout)[0]["log_dir"] == "L"
    # paths in the options stay relative to the caller's folder
    r = run(os.path.join(SCRIPTS, "pretrain.sh"), os.path.join(REPO, cfg), "--train-dataset", "data", cwd=tmp_path)
    assert msrun_options(r.stdout)[1][-2:] == ["--train-dataset", "data"]


def test_run_scripts_one_worker_runs_directly():
    r = run(os.path.join(SCRIPTS, "predict.sh"), "configs/ascend/predict_7b.yaml", "--prompt", "你好")
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout.strip())[:4] == ["python", "-m", "telechat2", "predict"]
    assert "one worker" in r.stderr


@pytest.mark.parametrize("script, config, message", [
    ("predict.sh", "configs/ascend/finetune_7b_o1.yaml", "has run_mode finetune; use pretrain.sh or finetune.sh"),
    ("finetune.sh", "configs/ascend/predict_7b.yaml", "has run_mode predict; use predict.sh"),
    ("pretrain.sh", "configs/ascend/nope.yaml", "no such config file"),
    ("pretrain.sh", "configs/cpu/pretrain_tiny.yaml 2 3", "got 2 value(s)"),
])
def test_run_scripts_errors(script, config, message):
    r = run(os.path.join(SCRIPTS, script), *config.split())
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_run_scripts_refuse_a_bad_config_before_starting(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  bogus: 1\n")
    r = run(os.path.join(SCRIPTS, "pretrain.sh"), str(bad))
    assert r.returncode == 2 and "unknown key 'model.bogus'" in r.stderr and "Traceback" not in r.stderr


# ---- real msrun runs on this CPU -------------------------------------------------------------------------

def test_pretrain_sh_two_workers_tiny_data_parallel(tmp_path):
    """The tiny config through pretrain.sh on 2 local workers (data_parallel 2): both ranks step, rank 0 reports."""
    out, logs = tmp_path / "out", tmp_path / "msrun_log"
    with msrun_slot(2):
        r = run(os.path.join(SCRIPTS, "pretrain.sh"), PRETRAIN_TINY, "2", "--no-progress",
                "--set", "parallel_config.data_parallel=2", "--set", "runner_config.max_steps=2",
                "--set", f"output_dir={out}", dry=False,
                env={"LOG_DIR": str(logs), "MASTER_PORT": str(free_port()), "CLUSTER_TIME_OUT": "120"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for rank in (0, 1):
        assert "step:[    2/    2]" in (logs / f"worker_{rank}.log").read_text()
    with open(out / "report" / "report.json") as fh:
        run_info = json.load(fh)["run"]
    assert run_info["devices"] == 2
