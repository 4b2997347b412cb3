"""Run configs in the MindFormers YAML layout: schema, `base_config` inheritance, `--set`, validation.

The schema below lists every key with its default, and every key takes effect or is refused: keys the
code reads are listed in USED (with the reader), keys MindFormers users carry for its own runtime are in
ACCEPTED_VALUES with the values that describe what this implementation does (any other value is refused
with the reason). An unknown key is an error naming it and the closest valid one.
"""
from __future__ import annotations

import copy
import difflib
import os

import yaml

from ..config import ConfigError, TeleChat2Config
from ..lora_config import PET_CONFIG_DEFAULTS, PET_SOURCE, LoRASettings, model_layers
from ..options import check_run_config_values
from ..textio import read_yaml

LOW_PRECISION = ("float16", "bfloat16")

SCHEMA: dict = {
    "seed": 0,
    "output_dir": "./output",
    "load_checkpoint": "",
    "auto_trans_ckpt": False,           # accepted: any checkpoint loads into any layout here
    "resume_training": False,
    "run_mode": "train",                # train (pretraining) | finetune (SFT)
    "trainer": {"type": "CausalLanguageModelingTrainer", "model_name": "telechat2"},
    "runner_config": {
        "epochs": 1,
        "batch_size": 1,                # per data-parallel rank, per micro step
        "sink_mode": True,
        "sink_size": 1,
        "gradient_accumulation_steps": 1,
        "max_steps": -1,                # stop after this many optimizer steps (-1: the whole data)
    },
    "runner_wrapper": {
        "type": "MFTrainOneStepCell",
        "scale_sense": 1.0,             # a number (static) or {type: DynamicLossScaleUpdateCell, ...}
        "use_clip_grad": True,
        "max_grad_norm": 1.0,
    },
    # AMP level (not the jit compile level): O0 fp32; O1 matmuls in `dtype`; O2 the network in `dtype`
    # except norms, softmax, RoPE tables and loss, fp32 master weights. "none": model_config dtypes as written.
    "amp": {"level": "none", "dtype": "bfloat16"},
    "optimizer": {"type": "AdamW", "betas": [0.9, 0.95], "eps": 1.0e-8, "weight_decay": 0.1},
    "lr_schedule": {
        "type": "CosineWithWarmUpLR",
        "learning_rate": 1.5e-4,
        "lr_end": 1.5e-5,
        "warmup_ratio": 0.0,
        "warmup_steps": 0,              # used when warmup_ratio is 0
        "total_steps": -1,              # -1: the number of optimizer steps of the run
    },
    "train_dataset": {
        "data_loader": {"type": "MindDataset", "dataset_dir": "", "shuffle": True},
        "input_columns": ["input_ids"],
        "batch_size": None,             # MindFormers copies runner_config.batch_size here; must agree if set
        "drop_remainder": True,
        "num_parallel_workers": 1,
        "python_multiprocessing": False,
        "numa_enable": False,
        "prefetch_size": 1,
        "tokenizer": "",                # for raw .jsonl dataset_dir: the tokenizer.model to preprocess with
    },
    "use_parallel": None,               # None: as the layout says; False with a multi-device layout is refused
    "parallel": {
        "parallel_mode": 1,             # 1: the explicit layout of parallel_config; 0: data parallel only
        "gradients_mean": True,
        "enable_alltoall": False,
        "full_batch": True,
        "search_mode": "sharding_propagation",
        "enable_parallel_optimizer": False,
        "strategy_ckpt_save_file": "./ckpt_strategy.ckpt",
        "parallel_optimizer_config": {"gradient_accumulation_shard": False, "parallel_optimizer_threshold": 64},
        # interleaved 1F1B: True with model.model_config.pp_interleave_num chunks per pipeline rank
        "pipeline_config": {"pipeline_interleave": False, "pipeline_scheduler": "1f1b"},
    },
    "parallel_config": {
        "data_parallel": 1,
        "model_parallel": 1,
        "pipeline_stage": 1,
        "context_parallel": 1,
        "use_seq_parallel": False,
        "micro_batch_num": 1,
        "vocab_emb_dp": True,
        "gradient_aggregation_group": 4,
        "expert_parallel": 1,
    },
    # mixture of experts (MindFormers' moe_config). None: the model's value (preset / model_config)
    "moe_config": {
        "expert_num": None,             # -> model_config.num_experts
        "num_experts_chosen": None,     # -> model_config.moe_top_k
        "capacity_factor": None,        # -> model_config.capacity_factor (0: dropless)
        "aux_loss_coef": None,          # -> model_config.aux_loss_coef
        "aux_loss_factors": None,       # MindFormers' spelling of the coefficient: [coef] with aux_loss_types [expert]
        "aux_loss_types": None,
        "routing_policy": None,
        "router_dense_type": None,
        "shared_expert_num": None,
        "enable_sdrop": None,
        "use_fused_ops_topkrouter": None,
        "group_wise_a2a": None,
        "comp_comm_parallel": None,
        "comp_comm_parallel_degree": None,
        "balance_via_topk_bias": None,
        "topk_bias_update_rate": None,
        "ep_extend_tp": None,
        "comm_chunks": None,            # -> model_config.moe_comm_chunks (dropless only)
    },
    "micro_batch_interleave_num": 1,
    "recompute_config": {
        "recompute": False,
        "select_recompute": False,
        "select_comm_recompute": False,
        "parallel_optimizer_comm_recompute": False,
        "mp_comm_recompute": True,
        "recompute_slice_activation": False,
    },
    "callbacks": [
        {"type": "MFLossMonitor", "per_print_times": 1},
        {"type": "CheckpointMonitor", "prefix": "telechat2", "save_checkpoint_steps": 1000,
         "keep_checkpoint_max": 3, "checkpoint_format": "safetensors", "integrated_save": False},
    ],
    "context": {
        "mode": 0,                      # 0: graph (ms.jit on the step), 1: PyNative
        "device_target": "CPU",
        "max_call_depth": 10000,
        "max_device_memory": "58GB",
        "save_graphs": False,
        "save_graphs_path": "./graph",
        "device_id": 0,
        "jit_config": {"jit_level": "O0"},   # the compile level, not the AMP level
    },
    "model": {
        "preset": "",                   # a TeleChat2Config preset; model_config keys override it
        "model_config": {},             # TeleChat2Config fields (checked by TeleChat2Config.from_model_config)
        "arch": {"type": "TeleChat2ForCausalLM"},
    },
    "processor": {"tokenizer": {"vocab_file": "", "type": "TeleChat2Tokenizer"}},
    # performance report
    # performance report: per-device peak for MFU (0: measure this machine's MindSpore GEMM); comm_profile:
    # count every collective of step 1 (run eagerly) into report/comm_rank_R.json (parallel/comm_profile.py)
    "report": {"peak_tflops": 0.0, "comm_profile": False},
}

# Top-level MindFormers keys outside the schema's defaults: accepted only with the values in ACCEPTED_VALUES.
MINDFORMERS_ONLY = {
    "src_strategy_path_or_dir": "", "only_save_strategy": False, "ignore_data_skip": False, "load_ckpt_format": "ckpt",
    "train_dataset_task": None, "profile": False, "profile_start_step": 1, "profile_stop_step": 10,
    "init_start_profile": False, "profile_communication": False, "profile_memory": False, "layer_scale": False,
    "layer_decay": 0.65, "lr_scale_factor": 256, "eval_dataset": None, "eval_dataset_task": None, "do_eval": False,
    "metric": None,
}

# Keys the code reads (dotted path -> the reader).
USED = {
    "seed": "data order, initial weights (loop.set_up, DataLoader)",
    "output_dir": "loop.set_up", "load_checkpoint": "loop.build", "resume_training": "loop.set_up",
    "run_mode": "loop.check_columns, prepare_dataset (pretrain or SFT)",
    "trainer.model_name": "report.json (run.model_name)",
    "runner_config.epochs": "DataLoader", "runner_config.batch_size": "DataLoader, global batch",
    "runner_config.gradient_accumulation_steps": "micro-batches per step", "runner_config.max_steps": "loop.set_up",
    "runner_config.sink_size": "must be 1 with sink_mode (validate_run_config)",
    "runner_wrapper.scale_sense": "LossScaler", "runner_wrapper.use_clip_grad": "TrainStep",
    "runner_wrapper.max_grad_norm": "TrainStep",
    "amp.level": "model_config", "amp.dtype": "model_config",
    "optimizer.type": "validate_run_config (AdamW)", "optimizer.betas": "AdamW", "optimizer.eps": "AdamW",
    "optimizer.weight_decay": "AdamW",
    "lr_schedule.type": "lr_at", "lr_schedule.learning_rate": "lr_at", "lr_schedule.lr_end": "lr_at",
    "lr_schedule.warmup_ratio": "lr_at", "lr_schedule.warmup_steps": "lr_at", "lr_schedule.total_steps": "lr_at",
    "train_dataset.data_loader.dataset_dir": "prepare_dataset", "train_dataset.data_loader.shuffle": "DataLoader",
    "train_dataset.input_columns": "loop.check_columns (each must be in the data)",
    "train_dataset.batch_size": "validate_run_config (= runner_config.batch_size)",
    "train_dataset.num_parallel_workers": "DataLoader (MindDataset num_parallel_workers)",
    "train_dataset.numa_enable": "runtime.configure_mindspore (dataset config)",
    "train_dataset.prefetch_size": "runtime.configure_mindspore (dataset config)",
    "train_dataset.tokenizer": "prepare_dataset",
    "use_parallel": "runtime.check_launch (must agree with the layout)",
    "parallel.parallel_mode": "validate_run_config",
    "parallel.enable_parallel_optimizer": "Layout (the distributed optimizer over dp)",
    "parallel.parallel_optimizer_config.gradient_accumulation_shard": "TrainStep (gradient_buffers)",
    "parallel.pipeline_config.pipeline_interleave": "pipeline_chunks (interleaved 1F1B, parallel/pipeline.py)",
    "parallel_config.data_parallel": "Layout", "parallel_config.model_parallel": "Layout",
    "parallel_config.pipeline_stage": "Layout", "parallel_config.context_parallel": "Layout",
    "parallel_config.use_seq_parallel": "Layout", "parallel_config.micro_batch_num": "Layout, micro-batches",
    "recompute_config.recompute": "loop.recompute_layers (full layers)",
    "recompute_config.select_recompute": "loop.recompute_layers (attention core + SwiGLU activation)",
    "recompute_config.mp_comm_recompute": "loop.build (Cell.recompute of fully recomputed layers)",
    "recompute_config.recompute_slice_activation": "loop.build (Cell.recompute of fully recomputed layers)",
    "context.mode": "loop.Stepper (0: compiled step)", "context.device_target": "runtime.configure_mindspore",
    "context.max_call_depth": "runtime.configure_mindspore", "context.max_device_memory": "runtime.configure_mindspore, check-config",
    "context.save_graphs": "runtime.configure_mindspore", "context.save_graphs_path": "runtime.configure_mindspore",
    "context.device_id": "runtime.configure_mindspore (one device) / check_launch (msrun)",
    "context.jit_config.jit_level": "runtime.configure_mindspore, ms.jit of the step",
    "model.preset": "model_config", "model.model_config": "TeleChat2Config.from_model_config",
    "processor.tokenizer.vocab_file": "prepare_dataset, predict",
    "report.peak_tflops": "loop.Logger (MFU)",
    "report.comm_profile": "loop.train (step 1 profiled: report/comm_rank_R.json)",
    "moe_config.expert_num": "model_config (num_experts)", "moe_config.num_experts_chosen": "model_config (moe_top_k)",
    "moe_config.capacity_factor": "model_config (capacity_factor)", "moe_config.aux_loss_coef": "model_config (aux_loss_coef)",
    "moe_config.aux_loss_factors": "model_config (aux_loss_coef = the one factor)",
    "parallel_config.expert_parallel": "check_moe_layout (dividing data_parallel, or = model_parallel with "
                                       "moe_config.ep_extend_tp)",
    "moe_config.ep_extend_tp": "check_moe_layout (the experts split over the tp group: model/moe.py)",
    "moe_config.comm_chunks": "model_config (moe_comm_chunks: dispatch -> experts -> combine in chunks)",
    "callbacks.MFLossMonitor.per_print_times": "train loop (a log line every N steps and at the end)",
    "callbacks.CheckpointMonitor.save_checkpoint_steps": "train loop",
    "callbacks.CheckpointMonitor.keep_checkpoint_max": "checkpointing.save",
    "callbacks.CheckpointMonitor.prefix": "accepted: checkpoints are step_N folders (name kept for MindFormers yamls)",
    # LoRA (model.model_config.pet_config, present or absent; lora_config.LoRASettings checks the values)
    "model.model_config.pet_config.lora_rank": "parallel.lora.apply_lora (A [r, in], B [out, r])",
    "model.model_config.pet_config.lora_alpha": "parallel.lora.apply_lora (scale alpha / r)",
    "model.model_config.pet_config.lora_dropout": "parallel.lora.LoRA (dropout on the adapter's input, training)",
    "model.model_config.pet_config.target_modules": "LoRASettings.selects (regex, in full, over layer names)",
    "model.model_config.pet_config.exclude_layers": "LoRASettings.selects (regex of layers left out)",
}

ANY_PATH = object()       # ACCEPTED_VALUES: any value of the given type
# Keys whose only meaning is MindFormers' runtime: the values that describe this implementation, and why.
ACCEPTED_VALUES = {
    "auto_trans_ckpt": ((True, False), "any checkpoint loads into any layout here (no strategy files)"),
    "trainer.type": (("CausalLanguageModelingTrainer",), "the causal LM trainer is the only one"),
    "runner_config.sink_mode": ((True, False), "each step's batch is fed once per step (sink_size 1)"),
    "runner_wrapper.type": (("MFTrainOneStepCell", "TrainOneStepCell", "TrainOneStepWithLossScaleCell"),
                            "the step is train/step.py's TrainStep"),
    "train_dataset.data_loader.type": (("MindDataset",), "data are `telechat2 preprocess` MindRecord folders"),
    "train_dataset.drop_remainder": ((True,), "only whole global batches are trained"),
    "train_dataset.python_multiprocessing": ((False,), "no Python map operations run in the loader"),
    "parallel.gradients_mean": ((True, False), "the loss is normalised by the global batch's label tokens, so "
                                "gradients are summed over dp either way"),
    "parallel.enable_alltoall": ((False,), "no all-to-all is used: the expert dispatch all-gathers over the ep group"),
    "parallel.full_batch": ((True, False), "each data-parallel rank reads only its own samples"),
    "parallel.search_mode": (("sharding_propagation", "recursive_programming", "dynamic_programming"),
                             "layouts are explicit (no strategy search)"),
    "parallel.strategy_ckpt_save_file": (ANY_PATH, "no strategy file is written: checkpoints record their layout"),
    "parallel.parallel_optimizer_config.parallel_optimizer_threshold": (ANY_PATH, "every parameter's optimizer "
                                                                       "state is sharded"),
    "parallel_config.vocab_emb_dp": ((False, True), "the embedding and lm_head are vocab-parallel over "
                                     "model_parallel"),
    "parallel_config.gradient_aggregation_group": (ANY_PATH, "gradients are reduced in ~25 MB buckets"),
    "micro_batch_interleave_num": ((1,), "micro-batch interleaving is not implemented"),
    "parallel.pipeline_config.pipeline_scheduler": (("1f1b",), "the pipeline runs 1F1B, interleaved with "
                                                    "pipeline_interleave (seqpipe is not implemented)"),
    "recompute_config.select_comm_recompute": ((False, True), "collective outputs are recomputed with their layer"),
    "recompute_config.parallel_optimizer_comm_recompute": ((False, True), "the optimizer all-gather runs after "
                                                           "the step, nothing to recompute"),
    "model.arch.type": (("TeleChat2ForCausalLM",), "the one network class"),
    "processor.tokenizer.type": (("TeleChat2Tokenizer", "TelechatTokenizer"), "the SentencePiece tokenizer"),
    "callbacks.CheckpointMonitor.checkpoint_format": (("safetensors",), "checkpoints are written as safetensors"),
    "callbacks.CheckpointMonitor.integrated_save": ((False, True), "every rank writes its block; readers "
                                                    "assemble any layout"),
    "src_strategy_path_or_dir": (("", None), "checkpoints are layout-free: no strategy files are read"),
    "only_save_strategy": ((False,), "no strategy files"),
    "ignore_data_skip": ((False,), "a resumed run always continues at its data position"),
    "load_ckpt_format": (("ckpt", "safetensors"), "the format is detected from the files"),
    "train_dataset_task": ((None, {}, {"type": "CausalLanguageModelDataset"}), "the loader is DataLoader"),
    "profile": ((False,), "profiling is not implemented"),
    "profile_start_step": (ANY_PATH, "read only with profile: True"),
    "profile_stop_step": (ANY_PATH, "read only with profile: True"),
    "init_start_profile": ((False,), "profiling is not implemented"),
    "profile_communication": ((False,), "profiling is not implemented"),
    "profile_memory": ((False,), "profiling is not implemented"),
    "layer_scale": ((False,), "layer-wise LR scaling is not implemented"),
    "layer_decay": (ANY_PATH, "read only with layer_scale: True"),
    "lr_scale_factor": (ANY_PATH, "read only with layer_scale: True"),
    "do_eval": ((False,), "evaluation during training is not implemented"),
    "eval_dataset": (ANY_PATH, "read only with do_eval: True"),
    "eval_dataset_task": (ANY_PATH, "read only with do_eval: True"),
    "metric": (ANY_PATH, "read only with do_eval: True"),
    "moe_config.aux_loss_types": ((None, ["expert"]), "the one aux loss is Switch's expert load balance"),
    "moe_config.routing_policy": ((None, "TopkRouterV2"), "softmax, top-k, weights renormalised (model/moe.py)"),
    "moe_config.router_dense_type": ((None, "float32"), "the router is computed in fp32"),
    "moe_config.shared_expert_num": ((None, 0), "no shared experts (39B-A12B has none)"),
    "moe_config.enable_sdrop": ((None, False), "assignments beyond capacity are dropped in token order"),
    "moe_config.use_fused_ops_topkrouter": ((None, True, False), "the router is written with primitives"),
    "moe_config.group_wise_a2a": ((None, False), "no all-to-all: tokens are all-gathered over the expert group"),
    "moe_config.comp_comm_parallel": ((None, False), "no dispatch/compute overlap is implemented"),
    "moe_config.comp_comm_parallel_degree": (ANY_PATH, "read only with comp_comm_parallel: True"),
    "moe_config.balance_via_topk_bias": ((None, False), "load balance comes from the aux loss only"),
    "moe_config.topk_bias_update_rate": (ANY_PATH, "read only with balance_via_topk_bias: True"),
    "model.model_config.pet_config.pet_type": (("lora",), "LoRA is the parameter-efficient method implemented"),
    "model.model_config.pet_config.freeze_include": ((None, []), "only the adapters train: the base is frozen whole"),
    "model.model_config.pet_config.freeze_exclude": ((None, []), "only the adapters train: no base parameter is "
                                                     "left trainable"),
}
PET_PREFIX = "model.model_config.pet_config."

LOSS_SCALE_DEFAULTS = {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 65536.0, "scale_factor": 2.0,
                       "scale_window": 1000}


def _suggest(key, candidates) -> str:
    close = difflib.get_close_matches(key, sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


# path-valued keys: when written relative in a YAML file they are relative to that file's folder, so a config
# runs from any working directory (paths given with --set or on the command line are relative to the cwd)
PATH_KEYS = (("load_checkpoint",), ("train_dataset", "data_loader", "dataset_dir"), ("train_dataset", "tokenizer"),
             ("processor", "tokenizer", "vocab_file"))


def _anchor_paths(doc: dict, folder: str) -> None:
    for keys in PATH_KEYS:
        node = doc
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str) and node[keys[-1]] \
                and not os.path.isabs(node[keys[-1]]):
            node[keys[-1]] = os.path.normpath(os.path.join(folder, node[keys[-1]]))


def load_yaml_with_bases(path: str, _seen=()) -> dict:
    """A YAML file merged over its `base_config` (a path or list of paths, relative to the file)."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"{path}: base_config cycle")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    doc = read_yaml(path, error=ConfigError) or {}      # UTF-8 and YAML errors name the file and line
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a run config must be a mapping of keys")
    _anchor_paths(doc, os.path.dirname(path))
    bases = doc.pop("base_config", None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, load_yaml_with_bases(os.path.join(os.path.dirname(path), base), _seen + (path,)))
    return _merge(merged, doc)


def _check_keys(doc: dict, schema: dict, where: str, source: str) -> None:
    for key, value in doc.items():
        here = f"{where}{key}"
        if key not in schema:
            if not where and key in MINDFORMERS_ONLY:
                continue
            raise ConfigError(f"{source}: unknown key {here!r}{_suggest(key, schema)}")
        if key == "model_config" or key == "scale_sense":
            continue                      # checked by TeleChat2Config / the loss scaler
        if key == "callbacks":
            _check_callbacks(value, source)
        elif isinstance(schema[key], dict) and schema[key]:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {here} must be a mapping, got {value!r}")
            _check_keys(value, schema[key], here + ".", source)


def _check_callbacks(callbacks, source):
    known = {cb["type"]: cb for cb in SCHEMA["callbacks"]}
    if not isinstance(callbacks, list):
        raise ConfigError(f"{source}: callbacks must be a list of {{type: ...}} entries")
    for cb in callbacks:
        if not isinstance(cb, dict) or cb.get("type") not in known:
            t = cb.get("type") if isinstance(cb, dict) else cb
            raise ConfigError(f"{source}: callbacks: unknown callback {t!r}{_suggest(str(t), known)}")
        for k in cb:
            if k not in known[cb["type"]]:
                raise ConfigError(f"{source}: unknown key 'callbacks.{cb['type']}.{k}'{_suggest(k, known[cb['type']])}")


def _merge_callbacks(defaults: list, given: list) -> list:
    by_type = {cb["type"]: dict(cb) for cb in defaults}
    for cb in given:
        by_type[cb["type"]] = {**by_type[cb["type"]], **cb}
    return list(by_type.values())


def apply_set(doc: dict, assignment: str) -> None:
    """`a.b.c=value` (value parsed as YAML); `callbacks.<Type>.key=value` addresses a callback by type."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    path, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    keys = path.strip().split(".")
    node, schema = doc, SCHEMA
    for i, key in enumerate(keys[:-1]):
        if key == "callbacks":
            cb_type = keys[i + 1]
            cbs = doc.setdefault("callbacks", [])
            match = [cb for cb in cbs if cb.get("type") == cb_type]
            if not match:
                cbs.append({"type": cb_type})
                match = cbs[-1:]
            node = match[0]
            if len(keys) != i + 3:
                raise ConfigError(f"--set {path}: expected callbacks.<Type>.<key>")
            node[keys[-1]] = value
            return
        if key not in node or not isinstance(node[key], dict):
            if schema is not None and key not in schema and key not in MINDFORMERS_ONLY:
                raise ConfigError(f"--set {path}: unknown key {'.'.join(keys[:i + 1])!r}{_suggest(key, schema or {})}")
            node[key] = {}
        node = node[key]
        schema = schema.get(key) if isinstance(schema, dict) else None
    node[keys[-1]] = value


def load_run_config(path: str, overrides: list[str] = ()) -> dict:
    """The resolved run config: schema defaults <- base_config chain <- the file <- --set overrides."""
    doc = load_yaml_with_bases(path)
    if "moe_config" in doc and doc["moe_config"] is None:     # MindFormers' dense yamls write `moe_config: null`
        del doc["moe_config"]
    for assignment in overrides:
        apply_set(doc, assignment)
    _check_keys(doc, SCHEMA, "", path)
    callbacks = _merge_callbacks(SCHEMA["callbacks"], doc.pop("callbacks", []))
    cfg = _merge({**SCHEMA, **MINDFORMERS_ONLY}, doc)
    cfg["callbacks"] = callbacks
    validate_run_config(cfg, path)
    return cfg


def callback(cfg: dict, cb_type: str) -> dict:
    return next(cb for cb in cfg["callbacks"] if cb["type"] == cb_type)


def _need(cond, source, key, msg):
    if not cond:
        raise ConfigError(f"{source}: {key}: {msg}")


def lookup(cfg: dict, dotted: str):
    """The value at a dotted key path (`callbacks.<Type>.key` addresses a callback by type)."""
    keys = dotted.split(".")
    if keys[0] == "callbacks":
        return callback(cfg, keys[1]).get(keys[2])
    node = cfg
    for k in keys:
        node = node[k]
    return node


def check_accepted_values(cfg: dict, source: str) -> None:
    """Refuse, by name, a MindFormers-runtime key set to a value this implementation does not have."""
    pet = (cfg["model"].get("model_config") or {}).get("pet_config")
    for key, (allowed, why) in ACCEPTED_VALUES.items():
        if key.startswith(PET_PREFIX):              # LoRA keys: only when there is a pet_config
            if not isinstance(pet, dict):
                continue
            value = pet.get(key[len(PET_PREFIX):], PET_CONFIG_DEFAULTS[key[len(PET_PREFIX):]])
        else:
            value = lookup(cfg, key)
        if allowed is ANY_PATH or any(value == a and type(value) is type(a) for a in allowed):
            continue
        shown = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{source}: {key}: {value!r} is not supported here ({why}); accepted: {shown}")


def validate_run_config(cfg: dict, source: str) -> None:
    check_run_config_values(cfg, source)    # numbers finite and in range, switches boolean (options.py)
    check_accepted_values(cfg, source)
    rc = cfg["runner_config"]
    _need(cfg["run_mode"] in ("train", "finetune", "predict"), source, "run_mode",
          f"expected train, finetune or predict, got {cfg['run_mode']!r}")
    for key in ("batch_size", "gradient_accumulation_steps", "epochs"):
        _need(isinstance(rc[key], int) and rc[key] >= 1, source, f"runner_config.{key}", "must be an integer >= 1")
    _need(isinstance(rc["max_steps"], int) and (rc["max_steps"] == -1 or rc["max_steps"] >= 1), source,
          "runner_config.max_steps", "must be -1 or an integer >= 1")
    _need(not rc["sink_mode"] or rc["sink_size"] == 1, source, "runner_config.sink_size",
          f"{rc['sink_size']}: only 1 is implemented (the loop returns to the host after every step)")
    ppt = callback(cfg, "MFLossMonitor")["per_print_times"]
    _need(isinstance(ppt, int) and not isinstance(ppt, bool) and ppt >= 1, source,
          "callbacks.MFLossMonitor.per_print_times", f"must be an integer >= 1, got {ppt!r}")
    _need(cfg["parallel"]["parallel_mode"] in (0, 1), source, "parallel.parallel_mode",
          f"{cfg['parallel']['parallel_mode']!r}: 0 (data parallel) or 1 (semi-auto: the explicit layout of "
          "parallel_config) are implemented; auto-parallel search (2) and hybrid (3) are not")
    pc = cfg["parallel_config"]
    if cfg["parallel"]["parallel_mode"] == 0:
        _need(pc["model_parallel"] == pc["pipeline_stage"] == pc["context_parallel"] == 1, source,
              "parallel.parallel_mode", "0 is data parallel only; use 1 with model_parallel/pipeline_stage/"
              "context_parallel above 1")
    _need(cfg["use_parallel"] in (None, True, False), source, "use_parallel", "must be True or False")
    for key in ("enable_parallel_optimizer",):
        _need(isinstance(cfg["parallel"][key], bool), source, f"parallel.{key}", "must be True or False")
    _need(isinstance(cfg["report"]["comm_profile"], bool), source, "report.comm_profile",
          f"must be True or False, got {cfg['report']['comm_profile']!r}")
    check_pipeline_interleave(cfg, source)
    gas = cfg["parallel"]["parallel_optimizer_config"]["gradient_accumulation_shard"]
    _need(isinstance(gas, bool), source, "parallel.parallel_optimizer_config.gradient_accumulation_shard",
          f"must be True or False, got {gas!r}")
    for key in ("recompute", "select_recompute"):
        v = cfg["recompute_config"][key]
        _need(isinstance(v, bool) or (isinstance(v, list) and all(isinstance(n, int) and not isinstance(n, bool)
                                                                  and n >= 0 for n in v)),
              source, f"recompute_config.{key}", f"expected True/False or a list of layer counts per pipeline "
              f"stage (MindFormers' form), got {v!r}")
    jl = cfg["context"]["jit_config"]["jit_level"]
    _need(jl in ("O0", "O1"), source, "context.jit_config.jit_level",
          f"{jl!r}: MindSpore {'' if jl != 'O2' else '2.9 '}accepts O0 or O1 (this is the compile level, not AMP)")
    _need(cfg["context"]["mode"] in (0, 1), source, "context.mode", f"{cfg['context']['mode']!r}: expected 0 (graph) "
          "or 1 (PyNative)")
    _need(isinstance(cfg["train_dataset"]["num_parallel_workers"], int) and
          cfg["train_dataset"]["num_parallel_workers"] >= 1, source, "train_dataset.num_parallel_workers",
          "must be an integer >= 1")
    tb = cfg["train_dataset"]["batch_size"]
    _need(tb is None or tb == rc["batch_size"], source, "train_dataset.batch_size",
          f"{tb} disagrees with runner_config.batch_size={rc['batch_size']}")
    amp = cfg["amp"]
    _need(amp["level"] in ("none", "O0", "O1", "O2"), source, "amp.level",
          f"expected none, O0, O1 or O2, got {amp['level']!r} (jit compile levels live in context.jit_config)")
    _need(amp["dtype"] in LOW_PRECISION, source, "amp.dtype", f"expected float16 or bfloat16, got {amp['dtype']!r}")
    opt = cfg["optimizer"]
    _need(opt["type"] in ("AdamW", "AdamWeightDecay", "FusedAdamWeightDecay"), source, "optimizer.type",
          f"only AdamW is implemented, got {opt['type']!r}")
    _need(isinstance(opt["betas"], (list, tuple)) and len(opt["betas"]) == 2, source, "optimizer.betas",
          "must be [beta1, beta2]")
    lr = cfg["lr_schedule"]
    _need(lr["type"] in ("CosineWithWarmUpLR", "constant", "ConstantWarmUpLR"), source, "lr_schedule.type",
          f"expected CosineWithWarmUpLR or constant, got {lr['type']!r}")
    _need(0 <= lr["warmup_ratio"] < 1, source, "lr_schedule.warmup_ratio", "must be in [0, 1)")
    cp = callback(cfg, "CheckpointMonitor")
    _need(isinstance(cp["save_checkpoint_steps"], int) and cp["save_checkpoint_steps"] >= 1, source,
          "callbacks.CheckpointMonitor.save_checkpoint_steps", "must be an integer >= 1")
    _need(isinstance(cp["keep_checkpoint_max"], int) and cp["keep_checkpoint_max"] >= 1, source,
          "callbacks.CheckpointMonitor.keep_checkpoint_max", "must be an integer >= 1")
    ss = cfg["runner_wrapper"]["scale_sense"]
    if isinstance(ss, dict):
        for k in ss:
            _need(k in LOSS_SCALE_DEFAULTS, source, f"runner_wrapper.scale_sense.{k}",
                  f"unknown key{_suggest(k, LOSS_SCALE_DEFAULTS)}")
    else:
        _need(isinstance(ss, (int, float)) and ss > 0, source, "runner_wrapper.scale_sense",
              f"must be a positive number or a DynamicLossScaleUpdateCell mapping, got {ss!r}")
    check_moe_layout(model_config(cfg, source), cfg, source)   # validates the model block (and pet_config)
    _need(not (cfg["model"].get("model_config") or {}).get("pet_config") or cfg["load_checkpoint"], source,
          "load_checkpoint", f"{PET_SOURCE} trains LoRA adapters over a base model: set load_checkpoint "
          "(--load-checkpoint BASE) to its weights")


def model_config(cfg: dict, source: str = "run config") -> TeleChat2Config:
    """The TeleChat2Config of a run: preset <- model_config <- the AMP level's dtypes."""
    m = cfg["model"]
    mc = dict(m.get("model_config") or {})
    pet = mc.pop("pet_config", None)
    lora = LoRASettings.from_pet_config(pet, f"{source}: {PET_SOURCE}") if pet else None   # keys refused here
    base = {}
    if m.get("preset"):
        try:
            base = TeleChat2Config.from_preset(m["preset"]).to_model_config()
        except ConfigError as e:
            raise ConfigError(f"{source}: model.preset: {e}") from None
        base.pop("type")
    try:
        config = TeleChat2Config.from_model_config({**base, **mc})
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    config = _with_moe_config(config, cfg.get("moe_config") or {}, source)
    if lora is not None and not any(lora.selects(n) for n in model_layers(config)):
        raise ConfigError(f"{source}: {PET_SOURCE}.target_modules {lora.target_modules!r} matches no linear layer "
                          f"(names: {', '.join(model_layers(config)[:3])}, ..., lm_head)")
    level, low = cfg["amp"]["level"], cfg["amp"]["dtype"]
    if level == "none":
        return config
    fp32 = "float32"
    dtypes = {"O0": dict(compute_dtype=fp32, res_dtype=fp32),
              "O1": dict(compute_dtype=low, res_dtype=fp32),
              "O2": dict(compute_dtype=low, res_dtype=low)}[level]
    # O2 stores the weights in the low-precision dtype (AdamW keeps fp32 master shards); O0/O1 in fp32
    return config.replace(**dtypes, param_init_type=low if level == "O2" else fp32, layernorm_compute_type=fp32, softmax_compute_type=fp32,
                          rotary_dtype=fp32)


MOE_KEYS = {"expert_num": "num_experts", "num_experts_chosen": "moe_top_k", "capacity_factor": "capacity_factor",
            "aux_loss_coef": "aux_loss_coef", "comm_chunks": "moe_comm_chunks"}


def _with_moe_config(config: TeleChat2Config, moe: dict, source: str) -> TeleChat2Config:
    """The model config with the run's moe_config keys that are set (None: the model's value)."""
    overrides = {field: moe[key] for key, field in MOE_KEYS.items() if moe.get(key) is not None}
    factors = moe.get("aux_loss_factors")
    if factors is not None:
        _need(isinstance(factors, list) and len(factors) == 1 and moe.get("aux_loss_coef") is None, source,
              "moe_config.aux_loss_factors", f"expected one factor [coef] (for aux_loss_types [expert]) and no "
              f"aux_loss_coef beside it, got {factors!r}")
        overrides["aux_loss_coef"] = factors[0]
    if not overrides:
        return config
    try:
        return config.replace(**overrides)
    except ConfigError as e:
        msg = str(e)
        for key, field in MOE_KEYS.items():
            msg = msg.replace(f"model_config.{field}:", f"moe_config.{key} (model_config.{field}):")
        raise ConfigError(f"{source}: {msg}") from None


def check_moe_layout(config: TeleChat2Config, cfg: dict, source: str) -> None:
    """The layouts a MoE model runs with (model/moe.py): data parallel; the experts split over dp ranks
    (expert_parallel dividing data_parallel, and under tensor parallel split again over tp; with the distributed
    optimizer their buckets are sharded over their dp/ep replicas); tensor parallel,
    with or without sequence parallel, with the experts split over the tp group (moe_config.ep_extend_tp,
    expert_parallel = model_parallel); each of them under pipeline parallel (plain or interleaved 1F1B). Context
    parallel, and everything else, are refused by name."""
    pc, moe = cfg["parallel_config"], cfg.get("moe_config") or {}
    ep, tp, dp, extend = pc["expert_parallel"], pc["model_parallel"], pc["data_parallel"], moe.get("ep_extend_tp")
    _need(isinstance(ep, int) and not isinstance(ep, bool) and ep >= 1, source, "parallel_config.expert_parallel",
          f"must be an integer >= 1, got {ep!r}")
    _need(extend in (None, True, False), source, "moe_config.ep_extend_tp", f"must be True or False, got {extend!r}")
    if not config.num_experts:
        _need(ep == 1 and not extend, source, "parallel_config.expert_parallel" if ep != 1 else "moe_config.ep_extend_tp",
              "expert parallel needs a mixture-of-experts model (model_config.num_experts / moe_config.expert_num)")
        return
    _need(pc["context_parallel"] == 1, source, "parallel_config.context_parallel", f"{pc['context_parallel']}: "
          f"a mixture-of-experts model (num_experts={config.num_experts}) is implemented without context "
          "parallel; set context_parallel: 1")
    if extend:
        _need(ep == tp, source, "parallel_config.expert_parallel", f"{ep}: with moe_config.ep_extend_tp the expert "
              f"domain is the tensor-parallel group, so expert_parallel must equal model_parallel={tp}")
    elif ep > 1:                                        # the experts split over groups of ep data-parallel ranks
        _need(isinstance(dp, int) and dp % ep == 0, source, "parallel_config.expert_parallel",
              f"{ep} does not divide data_parallel={dp} (the experts are split over groups of expert_parallel "
              "data-parallel ranks)")
        _need(config.num_experts % ep == 0, source, "parallel_config.expert_parallel",
              f"{ep} does not divide the {config.num_experts} experts (model_config.num_experts / moe_config.expert_num)")
        _need(config.num_experts % (ep * tp) == 0, source, "parallel_config.expert_parallel",
              f"{ep} x model_parallel {tp} does not divide the {config.num_experts} experts (the expert domain is "
              "the ep group x the tp group)")
    else:
        _need(tp == 1, source, "parallel_config.model_parallel", f"{tp}: a mixture-of-experts model under tensor "
              "parallel splits its experts over the tp group: set moe_config.ep_extend_tp: True and "
              f"parallel_config.expert_parallel: {tp}")
    if tp > 1:
        _need(config.num_experts % tp == 0, source, "parallel_config.expert_parallel",
              f"{ep} does not divide the {config.num_experts} experts (model_config.num_experts / moe_config.expert_num)")


def pipeline_chunks(cfg: dict) -> int:
    """Model chunks per pipeline rank: model_config.pp_interleave_num with
    parallel.pipeline_config.pipeline_interleave: True (MindFormers' pair of keys), else 1."""
    v = (cfg["model"].get("model_config") or {}).get("pp_interleave_num", 1)
    return v if cfg["parallel"]["pipeline_config"]["pipeline_interleave"] else 1


def check_pipeline_interleave(cfg: dict, source: str) -> None:
    interleave = cfg["parallel"]["pipeline_config"]["pipeline_interleave"]
    v = (cfg["model"].get("model_config") or {}).get("pp_interleave_num", 1)
    pc = cfg["parallel_config"]
    _need(isinstance(interleave, bool), source, "parallel.pipeline_config.pipeline_interleave",
          f"must be True or False, got {interleave!r}")
    _need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, source, "model.model_config.pp_interleave_num",
          f"must be an integer >= 1, got {v!r}")
    if v > 1:
        _need(interleave, source, "model.model_config.pp_interleave_num", f"{v} chunks need "
              "parallel.pipeline_config.pipeline_interleave: True")
    if interleave and v > 1:
        _need(pc["pipeline_stage"] > 1, source, "parallel.pipeline_config.pipeline_interleave",
              "an interleaved pipeline needs parallel_config.pipeline_stage > 1")
        _need(pc["micro_batch_num"] % pc["pipeline_stage"] == 0, source, "parallel_config.micro_batch_num",
              f"{pc['micro_batch_num']}: interleaved 1F1B takes the micro-batches in groups of pipeline_stage "
              f"{pc['pipeline_stage']}; use a multiple of it")


def micro_batches_per_step(cfg: dict, layout) -> int:
    """Micro-batches per optimizer step on one data-parallel rank: accumulation steps x pipeline micro-batches."""
    return cfg["runner_config"]["gradient_accumulation_steps"] * (layout.micro_batch_num if layout.pp > 1 else 1)


def save_resolved(cfg: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False, allow_unicode=True)
    os.replace(tmp, path)
