"""SambaFlow's multigraph API: several graphs of one PEF share device tensors by region.

Our own small models: a running sum kept on the device (one graph starts it, another adds to it
in place), an index the model computes in int64 written into an int32 region, and a cache that
one graph fills with sn_scatter and another reads. Compile writes one PEF; a fresh trace in the
same process loads it with init_multigraph_runtime, as an app's `run` does."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from sambaflow import samba
from sambaflow.errors import SambaPefError, SambaRunError, SambaTraceError
from sambaflow.samba.graph import FwdGraph
from sambaflow.samba.sn_private import sn_scatter
from sambaflow.samba.utils import trace_multigraph


class Scale(nn.Module):
    """start: acc = x * w; add: acc + x * w, and the next position (int64, capped like the modelzoo's)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x, acc=None, position=None, limit=7):
        if acc is None:
            return (x * self.w,)
        step = torch.minimum(position + 1, torch.full(position.shape, limit))
        return acc + x * self.w, step


def build(model):
    """Trace both graphs and connect them: 'add' reads 'start''s output and updates it in place."""
    samba.session.clear_graphs()
    x = samba.from_torch_tensor(torch.randn(2, 4), name="x")
    (acc,) = trace_multigraph(model, {"x": x}, trace_prefix="start")
    acc.sn_region_name = "acc"
    acc_in = samba.SambaTensor(name="acc_in", region_name="acc", shape=(2, 4), dtype=torch.float32)
    position = samba.from_torch_tensor(torch.zeros(2, 1, dtype=torch.int32), name="position")
    x2 = samba.from_torch_tensor(torch.randn(2, 4), name="x2")
    inputs = {"x": x2, "acc": acc_in, "position": position, "limit": 7}
    new_acc, step = trace_multigraph(model, inputs, trace_prefix="add")
    new_acc.sn_region_name = "acc"  # in place
    step.sn_region_name = "position"  # int64 computed, int32 region
    samba.session.add_graph(FwdGraph({"x": x}, (acc,), name="start"))
    samba.session.add_graph(FwdGraph(inputs, (new_acc, step), name="add"))


@pytest.fixture(scope="module")
def scale_pef(tmp_path_factory):
    torch.manual_seed(1)
    model = Scale()
    samba.from_torch_model_(model)
    build(model)
    folder = str(tmp_path_factory.mktemp("mg"))
    path = samba.session.compile_multigraph(name="scale", config_dict={"output_folder": folder})
    samba.session.clear_graphs()
    return model, path


def loaded(scale_pef):
    model, path = scale_pef
    build(model)
    samba.session.init_multigraph_runtime(path)
    return model


def test_graphs_share_a_region_and_update_it_in_place(scale_pef):
    model = loaded(scale_pef)
    w = model.w.detach().clone()
    x, x2 = torch.randn(2, 4), torch.randn(2, 4)
    samba.session.run(input_tensors={"x": x}, graph_name="start")
    stored = samba.session.store["acc"]
    position = torch.tensor([[3], [6]], dtype=torch.int32)
    out, step = samba.session.run({"x2": x2, "position": position}, graph_name="add")
    assert samba.session.store["acc"] is stored  # written into the same device tensor
    torch.testing.assert_close(out, x * w + x2 * w, rtol=1e-6, atol=1e-6)
    assert step.dtype == torch.int32 and step.flatten().tolist() == [4, 7]
    # a feed may name the input's tensor ('acc_in') or its region ('acc')
    samba.session.run({"acc_in": x * w, "x2": x2, "position": position}, graph_name="add")
    out, _ = samba.session.run({"acc": x * w, "x2": x2, "position": position}, graph_name="add")
    torch.testing.assert_close(out, x * w + x2 * w, rtol=1e-6, atol=1e-6)
    with pytest.raises(SambaRunError, match="input 'acc' is fed twice"):
        samba.session.run({"acc": x, "acc_in": x, "x2": x2}, graph_name="add")
    # the next run reads both regions as the last one left them: no feed for acc or position
    out, step = samba.session.run({"x2": x2}, graph_name="add")
    torch.testing.assert_close(out, x * w + 2 * x2 * w, rtol=1e-6, atol=1e-6)
    assert step.flatten().tolist() == [5, 7]
    (acc,) = samba.session.get_tensors_by_name(["acc"])
    torch.testing.assert_close(acc, out)


def test_int64_feeds_are_cast_to_an_int32_region_and_feeds_are_copied(scale_pef):
    loaded(scale_pef)
    position = torch.tensor([[1], [2]], dtype=torch.int64)
    samba.session.run({"x": torch.ones(2, 4)}, graph_name="start")
    _, step = samba.session.run({"x2": torch.ones(2, 4), "position": position}, graph_name="add")
    assert step.flatten().tolist() == [2, 3]
    assert position.flatten().tolist() == [1, 2]  # the app's tensor is not updated in place
    with pytest.raises(SambaRunError, match="compiled for torch.int32, given torch.int64"):
        samba.session.run({"x2": torch.ones(2, 4), "position": position + 2**40}, graph_name="add")


def test_errors_name_the_graph_and_the_inputs(scale_pef):
    loaded(scale_pef)
    with pytest.raises(SambaRunError, match=r"no graph named 'nope'.*\['add', 'start'\]"):
        samba.session.run({"x": torch.ones(2, 4)}, graph_name="nope")
    with pytest.raises(SambaRunError, match="pass graph_name="):
        samba.session.run({"x": torch.ones(2, 4)})
    with pytest.raises(SambaRunError, match=r"\['acc'\] were never fed nor written"):
        samba.session.run(
            {"x2": torch.ones(2, 4), "position": torch.zeros(2, 1, dtype=torch.int32)}, graph_name="add"
        )
    with pytest.raises(SambaRunError, match="'y' is not an input of this graph"):
        samba.session.run({"y": torch.ones(2, 4)}, graph_name="start")
    with pytest.raises(SambaRunError, match=r"compiled for shape \[2, 4\], given \[3, 4\]"):
        samba.session.run({"x": torch.ones(3, 4)}, graph_name="start")


def test_init_refuses_a_pef_without_the_graphs_the_app_adds(scale_pef, tmp_path):
    model, path = scale_pef
    build(model)
    x = samba.from_torch_tensor(torch.randn(2, 4), name="x")
    outputs = trace_multigraph(model, {"x": x}, trace_prefix="extra")
    samba.session.add_graph(FwdGraph({"x": x}, outputs, name="extra"))
    with pytest.raises(SambaRunError, match=r"has no graph\(s\) \['extra'\]"):
        samba.session.init_multigraph_runtime(path)


def test_init_names_the_graph_that_no_longer_matches_the_pef(scale_pef):
    model, path = scale_pef
    samba.session.clear_graphs()
    x = samba.from_torch_tensor(torch.randn(3, 4), name="x")  # compiled for [2, 4]
    samba.session.add_graph(
        FwdGraph({"x": x}, trace_multigraph(model, {"x": x}, trace_prefix="start"), name="start")
    )
    with pytest.raises(
        SambaPefError, match=r"(?s)graph 'start': .* 'x' has shape \[2, 4\] in the PEF, \[3, 4\] in the app"
    ):
        samba.session.init_multigraph_runtime(path)


def test_regions_must_agree_in_shape():
    model = Scale()
    samba.from_torch_model_(model)
    samba.session.clear_graphs()
    x = samba.from_torch_tensor(torch.randn(2, 4), name="x")
    (acc,) = trace_multigraph(model, {"x": x}, trace_prefix="start")
    acc.sn_region_name = "x3"
    x3 = samba.from_torch_tensor(torch.randn(3, 4), name="x3")
    (other,) = trace_multigraph(model, {"x": x3}, trace_prefix="wide")
    samba.session.add_graph(FwdGraph({"x": x}, (acc,), name="start"))
    samba.session.add_graph(FwdGraph({"x": x3}, (other,), name="wide"))
    with pytest.raises(
        SambaTraceError,
        match=r"region 'x3': graph 'start' output 'start__outputs__0' is .*\[2x4 float32\] but graph 'wide' input 'x3' is x3 \[3x4",
    ):
        samba.session.compile_multigraph(name="bad", config_dict={"output_folder": "/nonexistent-not-used"})


def test_add_graph_needs_the_traced_outputs():
    model = Scale()
    samba.from_torch_model_(model)
    samba.session.clear_graphs()
    x = samba.from_torch_tensor(torch.randn(2, 4), name="x")
    trace_multigraph(model, {"x": x}, trace_prefix="start")
    samba.session.add_graph(FwdGraph({"x": x}, (x,), name="start"))
    with pytest.raises(SambaTraceError, match="not the tensors trace_multigraph returned"):
        samba.session.compile_multigraph(name="bad", config_dict={})
    outputs = trace_multigraph(model, {"x": x}, trace_prefix="start")
    other = samba.from_torch_tensor(torch.randn(2, 4), name="x")
    samba.session.add_graph(FwdGraph({"x": other}, outputs, name="start"))
    with pytest.raises(SambaTraceError, match="inputs are not the tensors trace_multigraph traced it with"):
        samba.session.compile_multigraph(name="bad", config_dict={})
    samba.session.add_graph(FwdGraph({"x": x}, outputs, name="start"))  # a second add replaces the first
    samba.session.add_graph(FwdGraph({"x": x}, outputs, name="unknown"))
    with pytest.raises(SambaTraceError, match="'unknown' was added but not traced"):
        samba.session.compile_multigraph(name="bad", config_dict={})


def test_region_names_default_to_names_and_survive_casts():
    t = samba.from_torch_tensor(torch.zeros(2), name="a")
    assert t.sn_region_name == "a"
    t.sn_region_name = "shared"
    assert t.float().sn_region_name == "shared" and t.to(torch.int32).sn_name == "a"
    u = samba.SambaTensor(name="b", region_name="r", shape=(3,), dtype=torch.int32, sized_dims=["batch"])
    assert (u.sn_region_name, u.sized_dims, u.dtype) == ("r", ["batch"], torch.int32)
    assert samba.randn(2, 3, name="c", sized_dims=[None, "s"]).sized_dims == [None, "s"]
    named = samba.from_named_dict({"ids": torch.ones(2, dtype=torch.int32)})
    assert named["ids"].sn_name == "ids" and named["ids"].dtype == torch.int32


class Cache(nn.Module):
    """fill: scatter a row into a zero cache; read: add the next row in place, return the cache sum."""

    def forward(self, row, index, cache=None):
        if cache is None:
            cache = torch.zeros(2, 5, 3)
        cache = sn_scatter(cache, row.unsqueeze(1).unsqueeze(2), index.unsqueeze(-1), [0], batched_dims=1)
        return cache, cache.sum(dim=1)


def test_a_cache_filled_by_one_graph_is_updated_by_another(tmp_path):
    model = Cache()
    samba.session.clear_graphs()
    row = samba.from_torch_tensor(torch.zeros(2, 3), name="row")
    index = samba.from_torch_tensor(torch.zeros(2, 1, dtype=torch.int32), name="index")
    cache, total = trace_multigraph(model, (row, index), trace_prefix="fill")
    cache_in = samba.SambaTensor(name="cache_in", region_name=cache.sn_region_name, shape=(2, 5, 3))
    new_cache, total2 = trace_multigraph(
        model, {"row": row, "index": index, "cache": cache_in}, trace_prefix="read"
    )
    new_cache.sn_region_name = cache.sn_region_name
    total2.sn_region_name = total.sn_region_name = "total"
    samba.session.add_graph(FwdGraph((row, index), (cache, total), name="fill"))
    samba.session.add_graph(
        FwdGraph({"row": row, "index": index, "cache": cache_in}, (new_cache, total2), name="read")
    )
    path = samba.session.compile_multigraph(name="cache", config_dict={"output_folder": str(tmp_path)})
    assert os.path.exists(path)
    samba.session.init_multigraph_runtime(path)
    rows = torch.randn(3, 2, 3)
    expected = torch.zeros(2, 5, 3)
    for step in range(3):
        index = torch.tensor([[step], [4 - step]], dtype=torch.int32)
        expected[0, step] = rows[step, 0]
        expected[1, 4 - step] = rows[step, 1]
        samba.session.run({"row": rows[step], "index": index}, graph_name="fill" if step == 0 else "read")
        (got,) = samba.session.get_tensors_by_name(["total"])
        torch.testing.assert_close(got, expected.sum(dim=1), rtol=1e-6, atol=1e-6)
    # an out-of-bounds index writes nothing (the modelzoo pads with it)
    samba.session.run(
        {"row": torch.ones(2, 3), "index": torch.full((2, 1), 5, dtype=torch.int32)}, graph_name="read"
    )
    torch.testing.assert_close(samba.session.get_tensors_by_name(["total"])[0], expected.sum(dim=1))


class Nested(nn.Module):
    """forward(inputs={'a': x, 'pair': (x, y)}, scale=2.0): nested dicts and tuples, a constant."""

    def forward(self, inputs, scale=1.0, flag=None):
        a, (b, c) = inputs["a"], inputs["pair"]
        assert flag is None  # a constant left at its default
        return {"sum": (a + b) * scale, "prod": a * c}


def test_trace_multigraph_takes_nested_inputs_and_constants(tmp_path):
    samba.session.clear_graphs()
    x = samba.from_torch_tensor(torch.randn(3), name="x")
    y = samba.from_torch_tensor(torch.randn(3), name="y")
    inputs = {"inputs": {"a": x, "pair": (x, y)}, "scale": 2.0}
    outputs = trace_multigraph(Nested(), inputs, trace_prefix="nested")
    assert [o.sn_name for o in outputs] == [
        "nested__outputs__0",
        "nested__outputs__1",
    ]  # dict values, in order
    assert [tuple(o.shape) for o in outputs] == [(3,), (3,)]
    samba.session.add_graph(FwdGraph(inputs, outputs, name="nested"))
    path = samba.session.compile_multigraph(name="nested", config_dict={"output_folder": str(tmp_path)})
    samba.session.init_multigraph_runtime(path)
    a, b = torch.randn(3), torch.randn(3)
    total, product = samba.session.run({"x": a, "y": b}, graph_name="nested")
    torch.testing.assert_close(total, (a + a) * 2.0)
    torch.testing.assert_close(product, a * b)
    twin = samba.from_torch_tensor(torch.randn(3), name="x")
    with pytest.raises(SambaTraceError, match="two different input tensors are named 'x'"):
        trace_multigraph(Nested(), {"inputs": {"a": x, "pair": (twin, y)}}, trace_prefix="twin")
    with pytest.raises(SambaTraceError, match=r"input \['inputs'\]\['a'\] is a tensor without a name"):
        trace_multigraph(Nested(), {"inputs": {"a": torch.ones(3), "pair": (x, y)}}, trace_prefix="unnamed")
    with pytest.raises(SambaTraceError, match="trace_prefix 'no spaces' names the graph"):
        trace_multigraph(Nested(), inputs, trace_prefix="no spaces")
