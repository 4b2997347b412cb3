"""The trainer's LoRA wiring (`model.model_config.pet_config`, as MindFormers writes it).

`attach_for_training`: the base weights from `load_checkpoint` (also on `--resume`: checkpoints hold only the
adapters), the adapters attached (`parallel/lora.py`) and alone trainable, so `model.trainable_params()` is what
the optimizer updates and what every checkpoint saves; the base's fingerprint (path and sha256,
`checkpoint/adapters.py::base_fingerprint`) and the settings go into the model config's `lora` block, which each
checkpoint's `config.json` records. `check_resume`: the checkpoint to resume was written with the same settings
over the same base.
"""
from __future__ import annotations

import sys

from ..checkpoint.safetensors_io import CheckpointError
from ..lora_config import LoRAConfigError, LoRASettings, PET_SOURCE


def pet_config_of(cfg: dict) -> dict | None:
    return (cfg["model"].get("model_config") or {}).get("pet_config") or None


def attach_for_training(model, cfg: dict) -> list[str]:
    """Load the base, attach the adapters, record the base; returns this stage's adapted layer names."""
    from ..checkpoint.adapters import base_fingerprint, lora_block
    from ..checkpoint.load import load_weights
    from ..lora_config import model_layers
    from ..parallel.lora import apply_lora
    settings = LoRASettings.from_pet_config(pet_config_of(cfg))
    base = cfg["load_checkpoint"]
    if not base:
        raise LoRAConfigError(f"{PET_SOURCE}: LoRA trains adapters over a base model: set load_checkpoint "
                              "(--load-checkpoint BASE) to its weights")
    layers = apply_lora(model, settings)               # refuses a regex that matches nothing before any read
    load_weights(model, base, base_only=True)          # the base; the adapters keep their fresh values
    if settings.dropout > 0:
        model.set_train(True)                          # nn.Dropout is active only in training mode
    fingerprint = base_fingerprint(base)
    adapted = [n for n in model_layers(model.config) if settings.selects(n)]      # every pipeline stage's
    model.config = model.config.replace(extra={**model.config.extra, "lora": lora_block(settings, fingerprint,
                                                                                         adapted)})
    trainable = sum(p.size for p in model.trainable_params())
    total = sum(p.size for p in model.get_parameters())
    if model.mesh.rank == 0:
        print(f"[telechat2] LoRA: {len(adapted)} adapted layers (rank {settings.rank}, alpha {settings.alpha:g}), "
              f"{trainable:,} trainable parameters of {total:,} on this rank; base {base} (sha256 "
              f"{fingerprint['sha256'][:16]}...) frozen", file=sys.stderr)
    return layers


def check_resume(step_dir: str, model) -> None:
    """Refuse to resume a checkpoint written by a run with other LoRA settings, over another base, or without
    LoRA (and a LoRA checkpoint by a run without it)."""
    from ..config import TeleChat2Config
    recorded = TeleChat2Config.from_hf_config(step_dir).extra.get("lora")
    ours = model.config.extra.get("lora")
    if ours is None and recorded is None:
        return
    if ours is None:
        raise LoRAConfigError(f"{step_dir}: a LoRA checkpoint (adapters only; pet_config {recorded.get('pet_config')}):"
                              f" set the same {PET_SOURCE} to resume it")
    if recorded is None:
        raise LoRAConfigError(f"{step_dir}: a full-model checkpoint, which a run with {PET_SOURCE} cannot resume: "
                              "start a new output_dir (with load_checkpoint pointing at it as the base)")
    then = LoRASettings.from_pet_config(recorded["pet_config"], f"{step_dir}/config.json: lora.pet_config")
    now = LoRASettings.from_pet_config(ours["pet_config"])
    for key, value in ours["pet_config"].items():
        if then.to_pet_config().get(key) != value:
            raise LoRAConfigError(f"{PET_SOURCE}.{key}: {value!r}, but {step_dir} was trained with "
                                  f"{then.to_pet_config().get(key)!r}; resume with the same settings")
    if then != now:
        raise LoRAConfigError(f"{PET_SOURCE}: differs from the settings {step_dir} was trained with")
    was, base = recorded.get("base") or {}, ours["base"]
    if was.get("sha256") != base["sha256"]:
        raise CheckpointError(f"load_checkpoint {base['path']} (sha256 {base['sha256'][:16]}...) is not the base "
                              f"{step_dir} was trained on ({was.get('path')}, sha256 {str(was.get('sha256'))[:16]}...):"
                              " resume with the same base")
