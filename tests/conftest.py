import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))   # `reference` and `helpers` importable from tests
os.environ.setdefault("GLOG_v", "3")


@pytest.fixture(scope="session", autouse=True)
def _mindspore_cpu():
    import mindspore as ms
    ms.set_device("CPU")
    yield
