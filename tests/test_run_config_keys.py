"""Every key of the run-config schema takes effect or is refused by name.

The schema is walked: each leaf is either read by the code (USED, with its reader) or restricted to the values
that describe this implementation (ACCEPTED_VALUES; any other value refused with the reason). The keys users
set that were once accepted and ignored are checked for their effect here: context keys reach MindSpore,
num_parallel_workers drives the loader, select_recompute marks the attention core and the SwiGLU activation
(per pipeline stage as MindFormers writes it), and a multi-device layout started without msrun is refused
with the launch command.
"""
import os
import subprocess
import sys

import pytest

from helpers import preprocess_bundled
from telechat2.config import ConfigError
from telechat2.lora_config import PET_CONFIG_DEFAULTS
from telechat2.parallel.mesh import Layout, LayoutError
from telechat2.train import loop, runtime
from telechat2.train.run_config import (ACCEPTED_VALUES, ANY_PATH, MINDFORMERS_ONLY, SCHEMA, USED,
                                        load_run_config)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, "configs", "cpu", "pretrain_tiny.yaml")


def leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if key == "callbacks":
            for cb in value:
                yield from (f"callbacks.{cb['type']}.{k}" for k in cb if k != "type")
        elif isinstance(value, dict) and value and key != "model_config":
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def test_every_schema_key_is_used_or_restricted():
    keys = list(leaves({**SCHEMA, **MINDFORMERS_ONLY})) + [f"model.model_config.pet_config.{k}"
                                                           for k in PET_CONFIG_DEFAULTS]
    unclassified = [k for k in keys if k not in USED and k not in ACCEPTED_VALUES]
    assert not unclassified, unclassified
    stale = [k for k in [*USED, *ACCEPTED_VALUES] if k not in keys]
    assert not stale, stale
    assert not set(USED) & set(ACCEPTED_VALUES)


RESTRICTED = [k for k, (allowed, _) in ACCEPTED_VALUES.items() if allowed is not ANY_PATH]


@pytest.mark.parametrize("key", RESTRICTED)
def test_unsupported_value_is_refused_by_name(key):
    with pytest.raises(ConfigError) as e:
        load_run_config(PRETRAIN, [f"{key}=not-a-supported-value"])
    assert key.split(".")[-1] in str(e.value), str(e.value)


@pytest.mark.parametrize("setting, needle", [
    ("context.jit_config.jit_level=O2", "context.jit_config.jit_level: 'O2'"),
    ("runner_config.sink_size=4", "runner_config.sink_size: 4: only 1 is implemented"),
    ("callbacks.MFLossMonitor.per_print_times=0", "per_print_times: must be an integer >= 1"),
    ("parallel.parallel_mode=2", "parallel.parallel_mode: 2"),
    ("recompute_config.select_recompute=[1, 1]", None),       # valid form; the stage count is checked in set_up
])
def test_restricted_values(setting, needle):
    if needle is None:
        load_run_config(PRETRAIN, [setting])
        return
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_run_config(PRETRAIN, [setting])


def test_context_keys_reach_mindspore(monkeypatch):
    import mindspore as ms
    import mindspore.dataset as ds
    calls = {}
    monkeypatch.setattr(ms, "set_context", lambda **kw: calls.setdefault("context", kw))
    monkeypatch.setattr(ms, "set_device", lambda *a: calls.setdefault("device", a))
    monkeypatch.setattr(ds.config, "set_prefetch_size", lambda n: calls.setdefault("prefetch", n))
    monkeypatch.setattr(ds.config, "set_numa_enable", lambda b: calls.setdefault("numa", b))
    cfg = load_run_config(PRETRAIN, ["context.jit_config.jit_level=O1", "context.max_device_memory=3GB",
                                     "context.device_id=0", "context.max_call_depth=2000",
                                     "train_dataset.prefetch_size=3", "train_dataset.numa_enable=True"])
    runtime.configure_mindspore(cfg, Layout())
    assert calls["device"] == ("CPU", 0)
    assert calls["context"]["max_device_memory"] == "3GB"
    assert calls["context"]["jit_config"] == {"jit_level": "O1"}
    assert calls["context"]["max_call_depth"] == 2000
    assert (calls["prefetch"], calls["numa"]) == (3, True)


def test_launch_checks(monkeypatch):
    tp2 = Layout(tp=2)
    cfg = load_run_config(PRETRAIN, ["parallel_config.model_parallel=2"])
    monkeypatch.delenv("MS_WORKER_NUM", raising=False)
    monkeypatch.delenv("MS_ROLE", raising=False)
    with pytest.raises(LayoutError, match="started directly.*msrun"):
        runtime.check_launch(cfg, tp2)
    monkeypatch.setenv("MS_WORKER_NUM", "2")
    runtime.check_launch(cfg, tp2)                      # under msrun: fine
    with pytest.raises(LayoutError, match="use_parallel is False"):
        runtime.check_launch(load_run_config(PRETRAIN, ["parallel_config.model_parallel=2", "use_parallel=False"]),
                             tp2)
    with pytest.raises(LayoutError, match="context.device_id 3"):
        runtime.check_launch(load_run_config(PRETRAIN, ["parallel_config.model_parallel=2", "context.device_id=3"]),
                             tp2)
    with pytest.raises(LayoutError, match="msrun started 2 workers but the layout is one device"):
        runtime.check_launch(load_run_config(PRETRAIN), Layout())


def test_tensor_parallel_without_msrun_is_refused_with_the_launch_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MS_")}
    r = subprocess.run([sys.executable, "-m", "telechat2", "train", "--config", PRETRAIN, "--set",
                        f"output_dir={tmp_path}", "--set", "parallel_config.model_parallel=2"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "started directly" in r.stderr and "msrun_launcher.sh" in r.stderr


def test_recompute_layers_per_stage():
    rc = {"recompute": False, "select_recompute": True}
    assert loop.recompute_layers(rc, 4, 1, None) == {i: "select" for i in range(4)}
    # MindFormers' per-stage lists: the first n layers of each stage; full recompute wins
    rc = {"recompute": [1, 0], "select_recompute": [2, 1]}
    assert loop.recompute_layers(rc, 4, 2, None) == {0: "full", 1: "select", 2: "select"}
    with pytest.raises(loop.TrainError, match="has 3 entries, pipeline_stage is 2"):
        loop.recompute_layers({"recompute": False, "select_recompute": [1, 1, 1]}, 4, 2, None)
    with pytest.raises(loop.TrainError, match="3 layers asked of a stage of 2 layers"):
        loop.recompute_layers({"recompute": [3, 0], "select_recompute": False}, 4, 2, None)
    with pytest.raises(loop.TrainError, match="expected True/False or a list"):
        loop.recompute_layers({"recompute": {"attention": True}, "select_recompute": False}, 4, 1, None)


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory):
    return preprocess_bundled("pretrain", str(tmp_path_factory.mktemp("keys") / "pretrain"))


def test_select_recompute_marks_attention_core_and_activation(tmp_path, pretrain_data):
    cfg = load_run_config(PRETRAIN, [f"output_dir={tmp_path}", f"train_dataset.data_loader.dataset_dir={pretrain_data}",
                                     "recompute_config.select_recompute=True", "train_dataset.num_parallel_workers=2"])
    run = loop.set_up(cfg, resume=False, progress=False)
    assert run.loader().num_parallel_workers == 2                 # the loader's MindDataset workers
    more = load_run_config(PRETRAIN, [f"train_dataset.num_parallel_workers={(os.cpu_count() or 1) + 6}"])
    with pytest.warns(UserWarning, match="num_parallel_workers .* the loader uses"):
        assert loop.Run(**{**vars(run), "cfg": more}).loader().num_parallel_workers == (os.cpu_count() or 1)
    model, _, _ = loop.build(run)
    for layer in model.model.layers.values():
        assert "output_recompute" in layer.attention.core.get_flags()
        assert "output_recompute" in layer.feed_forward.act.get_flags()
        assert "output_recompute" not in layer.get_flags()       # the layer itself is kept
    cfg = load_run_config(PRETRAIN, [f"output_dir={tmp_path / 'full'}", "recompute_config.recompute=True",
                                     f"train_dataset.data_loader.dataset_dir={pretrain_data}"])
    model, _, _ = loop.build(loop.set_up(cfg, resume=False, progress=False))
    assert all("output_recompute" in layer.get_flags() for layer in model.model.layers.values())
