"""The MoE model (issue 18) equals the independent torch reference (tests/reference/moe_torch.py): logits,
the router aux loss and gradients, dropless and with a capacity factor that drops tokens."""
import os

import numpy as np
import pytest
import torch

import mindspore as ms
from helpers import REPO, write_hf_folder
from reference import moe_torch
from reference import telechat2_torch as ref
from telechat2 import TeleChat2Config, TeleChat2ForCausalLM
from telechat2.model.moe import expert_capacity
from cli_server import run_telechat2

TOL = 1e-4


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    cfg = TeleChat2Config.from_preset("tiny-moe")
    sd = ref.random_state_dict(cfg.to_hf_dict(), seed=5)
    return cfg, sd, write_hf_folder(str(tmp_path_factory.mktemp("hf_moe")), cfg, sd)


def _ids(cfg, batch, seq, seed=0):
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, (batch, seq)).astype(np.int32)


def _reference(cfg, sd, ids):
    """(logits, [aux per layer]) of the torch reference."""
    aux = []
    with torch.no_grad():
        logits = ref.forward(sd, cfg.to_hf_dict(), torch.from_numpy(ids).long(), aux_losses=aux).numpy()
    return logits, [float(a) for a in aux]


@pytest.mark.parametrize("seq", [24, 100], ids=["below-training-seqlen", "ntk"])
def test_dropless_logits_and_aux_equal_reference(release, seq):
    cfg, sd, hf_dir = release
    model = TeleChat2ForCausalLM.from_hf(hf_dir)
    ids = _ids(cfg, 2, seq)
    want, aux = _reference(cfg, sd, ids)
    assert np.abs(model(ids).asnumpy() - want).max() <= TOL
    assert abs(float(model.aux_loss(ids).asnumpy()) - cfg.aux_loss_coef * sum(aux)) <= 1e-6
    assert all(1.0 <= a <= cfg.num_experts for a in aux)      # E * sum f P: 1 when balanced, E when collapsed


@pytest.mark.parametrize("factor", [0.5])
def test_capacity_factor_drops_tokens_like_reference(release, factor):
    cfg, sd, hf_dir = release
    model = TeleChat2ForCausalLM.from_hf(hf_dir, capacity_factor=factor)
    ids = _ids(cfg, 2, 30, seed=1)
    T = ids.size
    assert expert_capacity(T, model.config) == moe_torch.capacity(T, model.config.to_hf_dict()) < T
    want, aux = _reference(model.config, sd, ids)
    dropless, _ = _reference(cfg, sd, ids)
    assert np.abs(want - dropless).max() > 1e-2                # tokens were really dropped
    out = model(ids).asnumpy()
    assert np.abs(out - want).max() <= TOL
    assert abs(float(model.aux_loss(ids).asnumpy()) - model.config.aux_loss_coef * sum(aux)) <= 1e-6
    jitted = ms.jit(model.construct)(ms.Tensor(ids)).asnumpy()
    assert np.abs(jitted - want).max() <= TOL


def test_training_loss_and_gradients_equal_reference(release):
    """next_token_loss = CE + coef * sum of the layers' aux losses; gradients of the router and the experts
    (through the renormalised top-k weights and the aux loss) equal torch autograd's."""
    cfg, sd, hf_dir = release
    model = TeleChat2ForCausalLM.from_hf(hf_dir, capacity_factor=1.0)
    ids = _ids(cfg, 2, 33, seed=2)
    inputs, targets = ids[:, :-1], ids[:, 1:].copy()
    targets[0, :5] = -100
    tsd = {n: t.clone().requires_grad_(True) for n, t in sd.items()}
    aux = []
    logits = ref.forward(tsd, model.config.to_hf_dict(), torch.from_numpy(inputs).long(), aux_losses=aux)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), torch.from_numpy(targets).long().reshape(-1),
                                           ignore_index=-100)
    loss = ce + cfg.aux_loss_coef * sum(aux)
    loss.backward()
    loss = loss.detach()
    params = {p.name: p for p in model.trainable_params()}
    names = ["model.layers.0.feed_forward.router.dense.weight", "model.layers.1.feed_forward.ffn.w1.weight",
             "model.layers.1.feed_forward.ffn.w2.bias", "model.layers.0.attention.wq.weight"]
    fn = ms.value_and_grad(lambda x, t: model.next_token_loss(x, t), None, [params[n] for n in names])
    value, grads = fn(ms.Tensor(inputs), ms.Tensor(targets))
    assert abs(float(value.asnumpy()) - loss.item()) <= 1e-5
    ce_part, aux_part = model.loss_parts(ms.Tensor(inputs), ms.Tensor(targets))
    assert abs(float(aux_part.asnumpy()) - cfg.aux_loss_coef * sum(a.item() for a in aux)) <= 1e-6
    want = {
        names[0]: tsd["transformer.h.0.mlp.router.weight"].grad.numpy(),
        names[1]: torch.stack([tsd[f"transformer.h.1.mlp.local_experts.{e}.gate_proj.weight"].grad
                               for e in range(cfg.num_experts)]).numpy(),
        names[2]: torch.stack([tsd[f"transformer.h.1.mlp.local_experts.{e}.down_proj.bias"].grad
                               for e in range(cfg.num_experts)])[None, :, None].numpy(),
        names[3]: tsd["transformer.h.0.self_attention.query.weight"].grad.numpy(),
    }
    for n, g in zip(names, grads):
        scale = np.abs(want[n]).max()
        assert scale > 0 and np.abs(g.asnumpy() - want[n]).max() <= 1e-4 * max(1.0, scale), n


def test_comm_chunks_equal_the_unchunked_path(release):
    """moe_comm_chunks 3 (uneven chunks of 14, 14, 12 tokens): logits, aux loss and gradients equal the unchunked
    model's, and the reference's (also under jit)."""
    cfg, sd, hf_dir = release
    whole = TeleChat2ForCausalLM.from_hf(hf_dir)
    chunked = TeleChat2ForCausalLM.from_hf(hf_dir, moe_comm_chunks=3)
    ids = _ids(cfg, 2, 21, seed=4)
    inputs, targets = ms.Tensor(ids[:, :-1]), ms.Tensor(ids[:, 1:])
    want, aux = _reference(cfg, sd, ids[:, :-1])
    out = chunked(ids[:, :-1]).asnumpy()
    assert np.abs(out - want).max() <= TOL and np.abs(out - whole(ids[:, :-1]).asnumpy()).max() <= 1e-6
    assert np.abs(ms.jit(chunked.construct)(inputs).asnumpy() - out).max() <= 1e-6
    grads = []
    for model in (whole, chunked):
        params = [p for p in model.trainable_params() if "layers.1.feed_forward" in p.name or "layers.0.attention.wq" in p.name]
        value, g = ms.value_and_grad(lambda x, t: model.next_token_loss(x, t), None, params)(inputs, targets)
        grads.append((float(value.asnumpy()), [x.asnumpy() for x in g]))
    assert abs(grads[0][0] - grads[1][0]) <= 1e-6
    assert all(np.abs(a - b).max() <= 1e-6 for a, b in zip(grads[0][1], grads[1][1]))
    assert abs(float(chunked.aux_loss(ids[:, :-1]).asnumpy()) - cfg.aux_loss_coef * sum(aux)) <= 1e-6


def test_negative_control_experts_swapped(release, tmp_path):
    """Loading experts 0 and 1 of every layer swapped breaks parity: the stacking order is checked."""
    cfg, sd, _ = release
    wrong = dict(sd)
    for i in range(cfg.num_layers):
        for part in ("gate_proj.weight", "up_proj.weight", "down_proj.weight", "down_proj.bias"):
            a, b = (f"transformer.h.{i}.mlp.local_experts.{e}.{part}" for e in (0, 1))
            wrong[a], wrong[b] = sd[b], sd[a]
    model = TeleChat2ForCausalLM.from_hf(write_hf_folder(str(tmp_path), cfg, wrong))
    ids = _ids(cfg, 2, 24)
    assert np.abs(model(ids).asnumpy() - _reference(cfg, sd, ids)[0]).max() > 10 * TOL


def test_dense_model_has_no_aux_loss(tmp_path):
    cfg = TeleChat2Config.from_preset("tiny")
    model = TeleChat2ForCausalLM(cfg)
    ids = _ids(cfg, 1, 16)
    assert float(model.aux_loss(ids).asnumpy()) == 0.0
    ce, aux = model.loss_parts(ms.Tensor(ids[:, :-1]), ms.Tensor(ids[:, 1:]))
    assert float(aux.asnumpy()) == 0.0


def test_generation_with_kv_cache_equals_reference_recompute(tmp_path):
    """Greedy decoding of the (dropless) MoE model with the KV cache and left padding gives the tokens of the
    torch reference re-running the whole sequence for every token (routing is per token when dropless)."""
    cfg = TeleChat2Config.from_preset("tiny-moe", vocab_size=512)
    sd = ref.random_state_dict(cfg.to_hf_dict(), seed=6, std=0.1)       # std 0.1: clear argmax margins
    model = TeleChat2ForCausalLM.from_hf(write_hf_folder(str(tmp_path), cfg, sd))
    rs = np.random.RandomState(3)
    prompts = [[int(t) for t in rs.randint(13, 500, n)] for n in (7, 12)]
    out = model.generate(prompts, max_new_tokens=12, eos_token_id=-1)
    for p, o in zip(prompts, out):
        seq = list(p)
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(ref.forward(sd, cfg.to_hf_dict(), torch.tensor([seq]))[0, -1].argmax()))
        assert o == seq


PRETRAIN = os.path.join(REPO, "configs", "cpu", "pretrain_tiny.yaml")


@pytest.mark.parametrize("sets,needle", [
    (["moe_config.num_experts_chosen=5"],
     "moe_config.num_experts_chosen (model_config.moe_top_k): must be an integer in [1, num_experts=4], got 5"),
    (["moe_config.capacity_factor=-1"], "moe_config.capacity_factor (model_config.capacity_factor): must be 0"),
    (["moe_config.aux_loss_factors=[0.01, 0.02]"], "moe_config.aux_loss_factors: expected one factor"),
    (["parallel_config.expert_parallel=2"],
     "parallel_config.expert_parallel: 2 does not divide data_parallel=1 (the experts are split over groups of"),
    (["parallel_config.data_parallel=4", "parallel_config.expert_parallel=4", "moe_config.expert_num=6"],
     "parallel_config.expert_parallel: 4 does not divide the 6 experts"),
    (["parallel_config.data_parallel=4", "parallel_config.expert_parallel=4", "parallel_config.model_parallel=2"],
     "parallel_config.expert_parallel: 4 x model_parallel 2 does not divide the 4 experts"),
    (["parallel_config.data_parallel=2", "parallel_config.expert_parallel=2", "parallel_config.context_parallel=2"],
     "parallel_config.context_parallel: 2: a mixture-of-experts model"),
    (["moe_config.ep_extend_tp=True", "parallel_config.expert_parallel=2"],
     "parallel_config.expert_parallel: 2: with moe_config.ep_extend_tp the expert domain is the tensor-parallel "
     "group, so expert_parallel must equal model_parallel=1"),
    (["moe_config.comm_chunks=2", "moe_config.capacity_factor=1.2"],
     "moe_config.comm_chunks (model_config.moe_comm_chunks): 2 chunks need dropless routing"),
    (["moe_config.comm_chunks=0"], "moe_config.comm_chunks (model_config.moe_comm_chunks): must be an integer >= 1"),
    (["parallel_config.model_parallel=2"],
     "parallel_config.model_parallel: 2: a mixture-of-experts model under tensor parallel splits its experts"),
    (["parallel_config.model_parallel=4", "parallel_config.expert_parallel=4", "moe_config.ep_extend_tp=True",
      "moe_config.expert_num=6"], "parallel_config.expert_parallel: 4 does not divide the 6 experts"),
    (["parallel_config.pipeline_stage=2", "parallel_config.micro_batch_num=2", "parallel_config.context_parallel=2"],
     "parallel_config.context_parallel: 2: a mixture-of-experts model (num_experts=4) is implemented without "
     "context parallel"),
    (["moe_config.ep_extend_tp=2"], "moe_config.ep_extend_tp: must be True or False, got 2"),
    (["model.preset=tiny", "parallel_config.expert_parallel=2"],
     "parallel_config.expert_parallel: expert parallel needs a mixture-of-experts model"),
])
def test_bad_moe_run_config_is_refused_by_name(sets, needle):
    from telechat2.config import ConfigError
    from telechat2.train.run_config import load_run_config, model_config
    with pytest.raises(ConfigError) as e:
        load_run_config(PRETRAIN, ["model.preset=tiny-moe", *sets])
    assert needle in str(e.value), str(e.value)
    cfg = model_config(load_run_config(PRETRAIN, ["model.preset=tiny", "moe_config.expert_num=8",
                                                  "moe_config.num_experts_chosen=2", "moe_config.capacity_factor=1.2",
                                                  "moe_config.aux_loss_factors=[0.02]"]))
    assert (cfg.num_experts, cfg.moe_top_k, cfg.capacity_factor, cfg.aux_loss_coef) == (8, 2, 1.2, 0.02)


def test_bad_moe_config_on_the_command_line_is_one_line():
    r = run_telechat2(["train", "--config", PRETRAIN, "--set", "model.preset=tiny-moe",
                        "--set", "moe_config.num_experts_chosen=9"])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "moe_config.num_experts_chosen (model_config.moe_top_k): must be an integer in [1, num_experts=4]" in r.stderr


def test_bad_expert_parallel_layout_on_the_command_line_is_one_line():
    """expert_parallel over dp that does not divide data_parallel: refused before anything starts (no msrun)."""
    r = run_telechat2(["train", "--config", PRETRAIN, "--set", "model.preset=tiny-moe",
                        "--set", "parallel_config.data_parallel=4", "--set", "parallel_config.expert_parallel=3"])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "parallel_config.expert_parallel: 3 does not divide data_parallel=4" in r.stderr, r.stderr[-2000:]
    assert "step" not in r.stdout


def test_expert_groups_and_checkpoint_writers_of_ep_over_dp():
    """dp4 with expert_parallel 2: ep groups of 2 consecutive dp ranks, each expert on the 2 ranks with the same
    ep rank; the first ep group writes the weights and AdamW state, the replicas read them."""
    from telechat2.parallel.mesh import Layout
    from telechat2.train.checkpointing import files_read, layout_record, optimizer_writer, same_layout, weight_writer
    lay = Layout(dp=4, ep=2)
    assert [lay.ep_groups(r) for r in (0, 3)] == [{"ep": [0, 1], "edp": [0, 2]}, {"ep": [2, 3], "edp": [1, 3]}]
    assert [weight_writer(lay, r) for r in range(4)] == [0, 1, 0, 1]
    assert [optimizer_writer(lay, r, False) for r in range(4)] == [0, 1, 0, 1]
    assert files_read("step", lay, 3, False)[1:] == ["rank_1/model.safetensors", "rank_1/optimizer.safetensors"]
    assert [weight_writer(Layout(dp=4), r) for r in range(4)] == [0, 0, 0, 0]
    record = layout_record(lay)
    assert record["expert_parallel"] == 2 and "expert_parallel" not in layout_record(Layout(dp=4))
    assert same_layout(record, lay) and not same_layout(record, Layout(dp=4))
    assert not same_layout(layout_record(Layout(dp=4)), lay)
    assert lay.describe() == "dp4(ep2) tp1 pp1 cp1"
