"""run_scripts/test_shards.py, the runner behind test.sh: how it deals the test files to its shards, when it
runs one plain pytest instead, and how the shards' exit statuses combine."""
import glob
import os
import sys

from dist_util import REPO

sys.path.insert(0, os.path.join(REPO, "run_scripts"))
import test_shards  # noqa: E402


def test_every_test_file_goes_to_exactly_one_shard_and_the_costs_balance():
    files = sorted(glob.glob(os.path.join(REPO, "tests", "test_*.py")))
    parts = test_shards.deal(files, 2)
    assert sorted(f for p in parts for f in p) == files
    loads = [sum(test_shards.cost(f) for f in p) for p in parts]
    # longest first onto the lighter shard: the shards differ by at most the largest single cost
    assert abs(loads[0] - loads[1]) <= max(test_shards.cost(f) for f in files)
    assert os.path.join(REPO, "tests", "test_ascend_configs.py") == parts[0][0]        # shard 1: longest first
    assert [test_shards.cost(f) for f in parts[1]] == sorted(test_shards.cost(f) for f in parts[1])


def test_a_test_path_means_one_plain_pytest():
    here = os.getcwd()
    os.chdir(REPO)
    try:
        assert test_shards.names_a_test("tests/test_config.py")
        assert test_shards.names_a_test("tests/test_config.py::test_presets")
        assert not test_shards.names_a_test("-q") and not test_shards.names_a_test("not_a_file_or_node")
    finally:
        os.chdir(here)


def test_shard_statuses_combine():
    assert test_shards.combined_status([0, 0]) == 0
    assert test_shards.combined_status([0, 1]) == 1 and test_shards.combined_status([2, 1]) == 2
    assert test_shards.combined_status([5, 0]) == 0          # -k selected nothing in one shard
    assert test_shards.combined_status([5, 1]) == 1
    assert test_shards.combined_status([5, 5]) == 5          # nothing selected anywhere
