import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Tests are about semantics unless they ask for a backend: the eager reference backend is the
# default here (subprocesses inherit it); Inductor tests name their backend explicitly.
os.environ.setdefault("SAMBAFLOW_BACKEND", "reference")


@pytest.fixture(autouse=True)
def _fresh_session():
    """Each test starts with no graph loaded and a fixed seed."""
    from sambaflow import samba

    samba.session.reset()
    torch.manual_seed(0)
    yield
    samba.session.reset()
