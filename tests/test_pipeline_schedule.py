"""Pure-python parts of pipeline parallel: stage assignment and the 1F1B order."""
import pytest

from telechat2.errors import TeleChat2Error
from telechat2.parallel.pipeline import one_f_one_b, stage_layers


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
