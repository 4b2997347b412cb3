#!/usr/bin/env bash
# The main job on this CPU with the tiny embedded config. Creates/updates .venv first.
# Today: the model's sizes and one forward + loss on random weights. Grows with training and inference.
source "$(dirname "$0")/_venv.sh"
echo "== telechat2 info --preset tiny"
telechat2 info --preset tiny
echo "== forward + loss of a randomly initialised tiny TeleChat2 (MindSpore, CPU, jit)"
python - <<'PY'
import time
import numpy as np
import mindspore as ms
from telechat2 import TeleChat2Config, TeleChat2ForCausalLM

ms.set_device("CPU")
ms.set_seed(0)
cfg = TeleChat2Config.from_preset("tiny")
model = TeleChat2ForCausalLM(cfg)
ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, cfg.seq_length)).astype(np.int32)
forward = ms.jit(model.construct)
t = time.perf_counter()
logits = forward(ms.Tensor(ids))
loss = forward(ms.Tensor(ids), ms.Tensor(ids))
print(f"logits {tuple(logits.shape)} {logits.dtype}; loss {float(loss.asnumpy()):.4f} "
      f"(ln V = {np.log(cfg.vocab_size):.4f} for an untrained model); {time.perf_counter() - t:.1f}s incl. compile")
PY
