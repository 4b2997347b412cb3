"""Numeric options and config values, parsed once, the same way everywhere.

A `Number` says what a value may be (int or float, finite, its range). The same object parses a command-line
option (`type=Number(...).arg("--top-k")`, argparse then exits 2 naming the option) and checks a config value
read from YAML or `--set` (`spec.check(value, "runner_wrapper.max_grad_norm", source)`, a ConfigError naming the
key). `train`, `predict`, `chat`, `check-config`, `plan`, `convert verify` and `preprocess` use these specs;
`RUN_CONFIG_VALUES` lists the run-config keys checked by `check_run_config_values`.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from .errors import TeleChat2Error


@dataclass(frozen=True)
class Number:
    kind: type = float                  # int or float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False               # lo itself excluded
    hi_open: bool = False
    also: tuple = ()                    # further allowed values outside the range (e.g. -1 for "all")

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        text = what + (" " + " and ".join(parts) if parts else "")
        return text + "".join(f" or {a}" for a in self.also)

    def _in_range(self, v) -> bool:
        if v in self.also:
            return True
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def parse(self, value):
        """The value as `kind`, or ValueError saying what was expected. Accepts text or an already parsed value."""
        if isinstance(value, bool):
            raise ValueError(f"expected {self.describe()}, got {value!r}")
        if isinstance(value, str):
            text = value.strip()
            try:
                v = int(text) if self.kind is int else float(text)
            except ValueError:
                raise ValueError(f"expected {self.describe()}, got {value!r}") from None
        elif isinstance(value, (int, float)):
            if self.kind is int and not (isinstance(value, int) or float(value).is_integer()):
                raise ValueError(f"expected {self.describe()}, got {value!r}")
            v = int(value) if self.kind is int else float(value)
        else:
            raise ValueError(f"expected {self.describe()}, got {value!r}")
        if self.kind is float and not math.isfinite(v):
            raise ValueError(f"expected {self.describe()}, got {value!r}")
        if not self._in_range(v):
            raise ValueError(f"expected {self.describe()}, got {value!r}")
        return v

    def arg(self, option: str):
        """An argparse `type=`: a bad value exits 2 with `argument OPTION: expected ..., got ...`."""
        def convert(text):
            try:
                return self.parse(text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        convert.__name__ = option           # argparse names the type in some messages
        return convert

    def check(self, value, key: str, source: str = "run config"):
        from .config import ConfigError
        try:
            return self.parse(value)
        except ValueError as e:
            raise ConfigError(f"{source}: {key}: {e}") from None


POSITIVE_INT = Number(int, 1)
NON_NEGATIVE_INT = Number(int, 0)
POSITIVE = Number(float, 0, lo_open=True)
NON_NEGATIVE = Number(float, 0)
PROBABILITY_OPEN = Number(float, 0, 1, lo_open=True)            # (0, 1]

# generation settings: the command-line flags of predict/chat and the same keys of model.model_config
GENERATION = {
    "max_new_tokens": POSITIVE_INT,
    "temperature": POSITIVE,
    "top_k": NON_NEGATIVE_INT,
    "top_p": PROBABILITY_OPEN,
    "repetition_penalty": POSITIVE,
    "seed": NON_NEGATIVE_INT,
}

# run-config keys beyond the ones validate_run_config already checks, with what they may be
RUN_CONFIG_VALUES = {
    ("seed",): NON_NEGATIVE_INT,
    ("runner_wrapper", "max_grad_norm"): POSITIVE,
    ("optimizer", "eps"): POSITIVE,
    ("optimizer", "weight_decay"): NON_NEGATIVE,
    ("lr_schedule", "learning_rate"): POSITIVE,
    ("lr_schedule", "lr_end"): NON_NEGATIVE,
    ("lr_schedule", "warmup_ratio"): Number(float, 0, 1, hi_open=True),
    ("lr_schedule", "warmup_steps"): NON_NEGATIVE_INT,
    ("lr_schedule", "total_steps"): Number(int, 1, also=(-1,)),
    ("context", "mode"): Number(int, 0, 1),
    ("report", "peak_tflops"): NON_NEGATIVE,
    ("parallel_config", "data_parallel"): POSITIVE_INT,
    ("parallel_config", "model_parallel"): POSITIVE_INT,
    ("parallel_config", "pipeline_stage"): POSITIVE_INT,
    ("parallel_config", "context_parallel"): POSITIVE_INT,
    ("parallel_config", "micro_batch_num"): POSITIVE_INT,
}
BETA = Number(float, 0, 1, hi_open=True)
RUN_CONFIG_BOOLS = (("resume_training",), ("use_parallel",), ("runner_wrapper", "use_clip_grad"),
                    ("train_dataset", "data_loader", "shuffle"), ("parallel_config", "use_seq_parallel"),
                    ("parallel", "enable_parallel_optimizer"))
# recompute_config.recompute / select_recompute: a bool or a per-stage list (train/run_config.py)


def _get(cfg: dict, keys: tuple):
    node = cfg
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def check_run_config_values(cfg: dict, source: str) -> None:
    """Every numeric key finite and in range, every switch a boolean, generation keys as the CLI flags;
    writes the parsed values back (so `--set lr_schedule.learning_rate=3e-4` given as text is a float)."""
    from .config import ConfigError
    for keys, spec in RUN_CONFIG_VALUES.items():
        value = _get(cfg, keys)
        if value is not None:
            _get(cfg, keys[:-1])[keys[-1]] = spec.check(value, ".".join(keys), source)
    for keys in RUN_CONFIG_BOOLS:
        value = _get(cfg, keys)
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{source}: {'.'.join(keys)}: expected True or False, got {value!r}")
    betas = _get(cfg, ("optimizer", "betas"))
    if isinstance(betas, (list, tuple)):
        cfg["optimizer"]["betas"] = [BETA.check(b, f"optimizer.betas[{i}]", source) for i, b in enumerate(betas)]
    mc = _get(cfg, ("model", "model_config")) or {}
    for key, spec in GENERATION.items():
        if key in mc and mc[key] is not None:
            mc[key] = spec.check(mc[key], f"model.model_config.{key}", source)
    if "do_sample" in mc and not isinstance(mc["do_sample"], bool):
        raise ConfigError(f"{source}: model.model_config.do_sample: expected True or False, got {mc['do_sample']!r}")


def require(spec: Number, value, name: str):
    """For library callers: `value` parsed by `spec`, or a TeleChat2Error naming `name`."""
    try:
        return spec.parse(value)
    except ValueError as e:
        raise TeleChat2Error(f"{name}: {e}") from None
