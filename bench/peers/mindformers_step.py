"""MindFormers' training step on the bench dims, run inside the peer venv (bench/train_step.py --peer mindformers):
`LlamaForCausalLM` (the TeleChat2 layer structure without biases) under `MFTrainOneStepCell` with AdamW,
clipping at 1.0 and a static loss scale of 1, graph mode, fp32. Prints one JSON line: median step seconds.

CPU settings MindFormers needs: `use_rope_slice=True` (its rotary kernel path), `fused_rms_norm=False` (the fused
kernel is Ascend-only); the overflow check takes MindSpore's IsFinite branch on CPU."""
import json
import statistics
import sys
import time

import numpy as np
import mindspore as ms


def main():
    a = json.loads(sys.argv[1])
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU", jit_config={"jit_level": "O0"})
    ms.set_seed(0)
    from mindformers import LlamaConfig, LlamaForCausalLM
    from mindformers.core.optim import AdamW
    from mindformers.wrapper import MFTrainOneStepCell
    cfg = LlamaConfig(batch_size=a["batch"], seq_length=a["seq"], hidden_size=a["hidden"], num_layers=a["layers"],
                      num_heads=a["heads"], intermediate_size=a["ffn"], vocab_size=a["vocab"],
                      compute_dtype="float32", layernorm_compute_type="float32", softmax_compute_type="float32",
                      rotary_dtype="float32", param_init_type="float32", use_rope_slice=True, fused_rms_norm=False,
                      use_flash_attention=False)
    model = LlamaForCausalLM(cfg)
    model.set_train(True)
    opt = AdamW(model.trainable_params(), learning_rate=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    class CPUStepCell(MFTrainOneStepCell):
        """The overflow check through IsFinite: MindSpore's NPU/FloatStatus kernels do not exist on CPU."""
        def get_overflow_status(self, status, compute_output):
            finite = ms.ops.ones((), ms.bool_)
            for g in compute_output:
                finite = ms.ops.logical_and(finite, ms.ops.isfinite(g).all())
            return ms.ops.logical_not(finite)

    step = CPUStepCell(model, opt, use_clip_grad=True, max_grad_norm=1.0, scale_sense=1.0)
    step.set_train(True)
    ids = ms.Tensor(np.random.RandomState(0).randint(0, a["vocab"], (a["batch"], a["seq"] + 1)).astype(np.int32))
    times = []
    for _ in range(a["warmup"] + a["steps"]):
        t = time.perf_counter()
        out = step(ids)
        float(out[0].asnumpy())
        times.append(time.perf_counter() - t)
    print(json.dumps({"step_s": statistics.median(times[a["warmup"]:]), "loss": float(out[0].asnumpy())}))


if __name__ == "__main__":
    main()
