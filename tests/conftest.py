import atexit
import os
import shutil
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Tests are about semantics unless they ask for a backend: the eager reference backend is the
# default here (subprocesses inherit it); Inductor tests name their backend explicitly.
os.environ.setdefault("SAMBAFLOW_BACKEND", "reference")
# Compiled packages go to a fresh folder per test session, never the user's ~/.cache (set
# SAMBAFLOW_CACHE_DIR to keep one across sessions).
if "SAMBAFLOW_CACHE_DIR" not in os.environ:
    os.environ["SAMBAFLOW_CACHE_DIR"] = tempfile.mkdtemp(prefix="sambaflow-test-cache-")
    atexit.register(shutil.rmtree, os.environ["SAMBAFLOW_CACHE_DIR"], ignore_errors=True)
# Compiling makes the user's own signing key (pef/sign.py) in $XDG_CONFIG_HOME, else ~/.config:
# tests make theirs in a fresh folder, never the real user's (subprocesses inherit it).
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="sambaflow-test-config-")
atexit.register(shutil.rmtree, os.environ["XDG_CONFIG_HOME"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh_session():
    """Each test starts with no graph loaded and a fixed seed."""
    from sambaflow import samba
    from sambaflow.samba.directives import forget_fusion_scopes

    samba.session.reset()
    samba.session.clear_graphs()  # multigraph traces (trace_multigraph / add_graph) too
    forget_fusion_scopes()  # op_fusion hints are process-wide: one test's would reach the next's log
    torch.manual_seed(0)
    yield
    samba.session.reset()
    samba.session.clear_graphs()
    forget_fusion_scopes()
