import pytest
import torch

import metarl


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


def all_families():
    return [metarl.make_family(name) for name in metarl.family_names()]
