"""SambaTensor, factories, conversions, from_torch_model_ and the public import paths."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sambaflow import samba

from models import ResFFNLogReg


def test_import_paths():
    import sambaflow
    import sambaflow.samba as samba_module
    import sambaflow.samba.optim
    import sambaflow.samba.utils as utils
    from sambaflow import __version__
    from sambaflow.samba import SambaTensor
    from sambaflow.samba.sambaloader import SambaLoader
    from sambaflow.samba.utils import utils as utils_utils

    assert samba_module is samba and isinstance(__version__, str) and sambaflow.__version__ == __version__
    assert sambaflow.samba.optim.SGD and sambaflow.samba.optim.AdamW and SambaLoader and SambaTensor
    assert utils.trace_graph is utils_utils.trace_graph


def test_sambatensor_attributes_and_repr():
    t = samba.randn(4, 5, name="image", batch_dim=0)
    assert isinstance(t, torch.Tensor) and t.sn_name == "image" and t.name == "image" and t.batch_dim == 0
    assert t.dtype == torch.float32 and t.shape == (4, 5) and t.sn_grad is None
    assert isinstance(t.data, torch.Tensor) and t.data.data_ptr() == t.data_ptr()
    assert "name='image'" in repr(t) and "batch_dim=0" in repr(t) and "(4, 5)" in repr(t)
    assert t.cpu().sn_name == "image" and t.rdu() is t
    plain = t.torch()
    assert (
        type(plain) is torch.Tensor
        and plain.data_ptr() == t.data_ptr()
        and t.torch_tensor().data_ptr() == t.data_ptr()
    )
    chained = t.bfloat16().float()
    assert chained.sn_name == "image" and chained.dtype == torch.float32 and chained.batch_dim == 0


def test_torch_operators_functions_and_modules_accept_sambatensors():
    t1, t2 = samba.randn(10, 20, name="a"), samba.randn(10, 20, name="b")
    assert torch.equal(t1 + t2, t1.torch() + t2.torch())
    assert torch.equal(torch.add(t1, t2), t1.torch() + t2.torch())
    assert t1.reshape(-1, 5).shape == (40, 5)
    z = t1.split(10, dim=1)
    assert len(z) == 2 and z[0].shape == (10, 10)
    assert torch.equal(F.relu(t1), F.relu(t1.torch()))
    conv = nn.Conv2d(kernel_size=(3, 3), in_channels=3, out_channels=8, padding=1, bias=True)
    x = samba.randn(2, 3, 16, 16, name="input", batch_dim=0)
    assert torch.equal(conv(x), conv(x.torch()))


def test_factories():
    assert samba.rand(3, 4, name="r").shape == (3, 4)
    assert samba.randn((2, 3), name="n").shape == (2, 3)
    high = samba.randint(10, (64,), name="label", batch_dim=0)
    assert high.dtype == torch.int64 and int(high.max()) < 10 and high.sn_name == "label"
    low_high = samba.randint(5, 7, (100,), name="l2")
    assert int(low_high.min()) >= 5 and int(low_high.max()) < 7
    like = samba.randn_like(samba.randn(3, 2, name="a", batch_dim=1), name="b")
    assert like.shape == (3, 2) and like.batch_dim == 1 and like.sn_name == "b"
    assert torch.equal(samba.zeros(2, 2, name="z"), torch.zeros(2, 2))
    assert torch.equal(samba.ones(2, name="o"), torch.ones(2))
    assert samba.normal(0.0, 1.0, (5, 5), name="g").shape == (5, 5)
    assert samba.randn(2, 2, requires_grad=True).requires_grad


def test_from_torch_tensor_shares_memory_and_to_torch():
    base = torch.zeros(3)
    wrapped = samba.from_torch_tensor(base, name="w", batch_dim=0)
    base[0] = 7.0
    assert wrapped[0] == 7.0 and samba.from_torch is samba.from_torch_tensor
    back = samba.to_torch(wrapped)
    assert type(back) is torch.Tensor and back.data_ptr() == base.data_ptr()
    pair = samba.to_torch((wrapped, [wrapped]))
    assert isinstance(pair, tuple) and type(pair[1][0]) is torch.Tensor
    assert samba.to_torch(base) is base


def test_from_torch_model_names_in_place_and_model_still_runs_eagerly():
    model = ResFFNLogReg(8, 4, 3)
    reference = copy.deepcopy(model)
    gemm1 = model.gemm1
    assert samba.from_torch_model_(model) is model and model.gemm1 is gemm1
    names = [p.sn_name for p in model.parameters()]
    assert names[:2] == ["gemm1__weight", "gemm1__bias"] and "norm2__bias" in names
    assert all(isinstance(p, nn.Parameter) and isinstance(p, samba.SambaTensor) for p in model.parameters())
    x, y = torch.randn(5, 8), torch.randint(3, (5,))
    loss, _ = model(x, y)
    loss.backward()
    want, _ = reference(x, y)
    assert torch.allclose(loss, want) and model.gemm1.weight.grad is not None
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # plain torch optimizers still work
    assert samba.from_torch_ is samba.from_torch_model_


def test_nested_modules_and_shared_parameters():
    inner = nn.Linear(3, 3)
    model = nn.Sequential(nn.Sequential(inner), inner)
    samba.from_torch_model_(model)
    assert model[0][0].weight is model[1].weight and model[1].weight.sn_name == "0__0__weight"


def test_state_dict_and_checkpoint_are_plain_tensors(tmp_path):
    model = ResFFNLogReg(8, 4, 3)
    samba.from_torch_model_(model)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict()}, path)
    loaded = torch.load(path)  # default weights_only=True
    assert type(loaded["model"]["gemm1.weight"]) is torch.Tensor
    clone = copy.deepcopy(model)
    assert clone.gemm1.weight.sn_name == "gemm1__weight"


def test_sambaloader_names_batches_and_propagates_errors():
    from sambaflow.samba.sambaloader import SambaLoader

    data = [(torch.randn(4, 3), torch.randint(2, (4,))) for _ in range(5)]
    seen = [(x.sn_name, y.sn_name, x.batch_dim) for x, y in SambaLoader(data, ["sample", "label"])]
    assert seen == [("sample", "label", 0)] * 5
    batches = list(SambaLoader(data, ["sample", "label"], return_original_batch=True))
    assert torch.equal(batches[2][0][0], data[2][0]) and batches[2][1] is data[2]
    with pytest.raises(samba_errors().SambaRunError, match="2 tensors but 1 names"):
        list(SambaLoader(data, ["sample"]))


def samba_errors():
    import sambaflow.errors

    return sambaflow.errors
