"""Pure-python parts of pipeline parallel: stage assignment and the 1F1B order."""
import pytest

from telechat2.errors import TeleChat2Error
from telechat2.parallel.pipeline import (bubble_fraction, interleaved_order, interleaved_ticks, one_f_one_b,
                                         rank_layers, stage_layers)


def test_even_and_uneven_stage_layers():
    assert [len(r) for r in stage_layers(8, 4)] == [2, 2, 2, 2]
    assert [len(r) for r in stage_layers(30, 4)] == [7, 8, 8, 7]          # the remainder goes to middle stages
    assert [len(r) for r in stage_layers(96, 5)] == [19, 20, 19, 19, 19]
    assert [len(r) for r in stage_layers(3, 2)] == [2, 1]
    layers = stage_layers(30, 4)
    assert layers[0].start == 0 and layers[-1].stop == 30
    assert all(a.stop == b.start for a, b in zip(layers, layers[1:]))


def test_offset_list_like_mindformers():
    assert [len(r) for r in stage_layers(64, 4, [-1, 1, 1, -1])] == [15, 17, 17, 15]    # published 35B layout
    with pytest.raises(TeleChat2Error, match="offset has 3 entries, pipeline_stage is 4"):
        stage_layers(64, 4, [1, 1, -2])
    with pytest.raises(TeleChat2Error, match="must be >= 1 and add up to num_layers 64"):
        stage_layers(64, 4, [1, 1, 1, 1])


@pytest.mark.parametrize("stages,micro", [(2, 4), (4, 8), (4, 4), (3, 2)])
def test_one_f_one_b_order(stages, micro):
    for s in range(stages):
        order = one_f_one_b(s, stages, micro)
        assert sorted(order) == sorted([("F", i) for i in range(micro)] + [("B", i) for i in range(micro)])
        # a backward never precedes its forward; in-flight forwards never exceed the stage's depth
        done, inflight, peak = set(), 0, 0
        for kind, i in order:
            if kind == "F":
                done.add(i)
                inflight += 1
            else:
                assert i in done
                inflight -= 1
            peak = max(peak, inflight)
        assert peak <= min(stages - s, micro)
    assert one_f_one_b(1, 2, 3) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]
    assert one_f_one_b(0, 2, 3) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)]


@pytest.mark.parametrize("stages,chunks,micro", [(2, 2, 4), (2, 2, 2), (4, 2, 8), (4, 3, 8), (2, 3, 6), (8, 3, 8)])
def test_interleaved_ticks(stages, chunks, micro):
    """Each (chunk, micro-batch) runs F and B exactly once per rank; an operation runs only after its inputs
    (F of the virtual stage before, B of the one after) at an earlier tick; each rank idles 2 (p - 1) ticks of
    2 v m + 2 (p - 1): with a chunk op 1/v of a stage op, the bubble is (p - 1) / (v m + p - 1)."""
    ticks = interleaved_ticks(stages, chunks, micro)
    last = stages * chunks - 1
    when = {}
    for t, row in enumerate(ticks):
        assert len(row) == stages
        for s, op in enumerate(row):
            if op is not None:
                kind, c, mb = op
                key = (kind, c * stages + s, mb)
                assert key not in when
                when[key] = t
    for s in range(stages):
        ops_ = [op for row in ticks for op in [row[s]] if op is not None]
        assert ops_ == interleaved_order(s, stages, chunks, micro)
        assert sorted(ops_) == sorted((k, c, i) for k in "FB" for c in range(chunks) for i in range(micro))
    for (kind, u, mb), t in when.items():
        if kind == "F" and u > 0:
            assert when[("F", u - 1, mb)] < t
        if kind == "B":
            assert when[("F", u, mb)] < t
            if u < last:
                assert when[("B", u + 1, mb)] < t
    assert len(ticks) == 2 * chunks * micro + 2 * (stages - 1)
    for s in range(stages):
        idle = sum(1 for row in ticks if row[s] is None)
        assert idle == 2 * (stages - 1)
        assert idle / len(ticks) == pytest.approx(bubble_fraction(stages, micro, chunks))
    assert bubble_fraction(8, 8) == 7 / 15 and bubble_fraction(8, 8, 3) == 7 / 31


def test_interleaved_warmup_and_layout():
    # Megatron's warm-up: (p - s - 1) * 2 + (v - 1) * p forwards, micro-batches in groups of p per chunk
    assert interleaved_order(0, 2, 2, 4)[:4] == [("F", 0, 0), ("F", 0, 1), ("F", 1, 0), ("F", 1, 1)]
    assert interleaved_order(1, 2, 2, 4)[:3] == [("F", 0, 0), ("F", 0, 1), ("F", 1, 0)]
    assert interleaved_order(1, 2, 2, 4)[3] == ("B", 1, 0)
    # virtual stage c * pp + s on rank s: 4 layers, pp2, 2 chunks -> rank 0 holds 0 and 2, rank 1 holds 1 and 3
    assert rank_layers(4, 2, 2) == [[range(0, 1), range(2, 3)], [range(1, 2), range(3, 4)]]
    assert [[len(b) for b in r] for r in rank_layers(96, 8, 3)] == [[4, 4, 4]] * 8
    assert rank_layers(3, 2) == [[range(0, 2)], [range(2, 3)]]
    with pytest.raises(TeleChat2Error, match="not a multiple of pipeline_stage 2 x pp_interleave_num 2"):
        rank_layers(6, 2, 2)
    with pytest.raises(TeleChat2Error, match="micro_batch_num 3 is not a multiple of pipeline_stage 2"):
        interleaved_order(0, 2, 2, 3)


@pytest.mark.parametrize("sets,message", [
    (["model.model_config.pp_interleave_num=2"], "2 chunks need parallel.pipeline_config.pipeline_interleave: True"),
    (["parallel.pipeline_config.pipeline_interleave=True", "model.model_config.pp_interleave_num=2"],
     "an interleaved pipeline needs parallel_config.pipeline_stage > 1"),
    (["parallel.pipeline_config.pipeline_interleave=True", "model.model_config.pp_interleave_num=2",
      "parallel_config.pipeline_stage=2", "parallel_config.micro_batch_num=3"],
     "micro_batch_num: 3: interleaved 1F1B takes the micro-batches in groups of pipeline_stage 2"),
])
def test_interleave_keys_refused_by_name(sets, message):
    """MindFormers' keys: parallel.pipeline_config.pipeline_interleave + model_config.pp_interleave_num."""
    import os
    from telechat2.config import ConfigError
    from telechat2.train.run_config import load_run_config, pipeline_chunks
    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "cpu",
                        "pretrain_tiny.yaml")
    with pytest.raises(ConfigError, match=message):
        load_run_config(tiny, sets)
    ok = load_run_config(tiny, ["parallel.pipeline_config.pipeline_interleave=True", "parallel_config.pipeline_stage=2",
                                "model.model_config.pp_interleave_num=2", "parallel_config.micro_batch_num=4"])
    assert pipeline_chunks(ok) == 2 and pipeline_chunks(load_run_config(tiny, [])) == 1
