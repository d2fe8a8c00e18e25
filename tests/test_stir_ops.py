"""The ops SambaNova's modelzoo model code calls, against numpy references on random data, and
traced into a PEF (0-d constants from sn_imm included) and run from it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from sambaflow import samba
from sambaflow.errors import SambaArgumentError
from sambaflow.samba import utils
from sambaflow.samba.directives import (
    FusionScope,
    active_fusion_scopes,
    fusion_scopes,
    op_fusion,
    sdpa_directives,
)
from sambaflow.samba.functional.stir import sn_imm, sn_iteridx, sn_select, sn_zipmapreduce
from sambaflow.samba.profiler import Profiler
from sambaflow.samba.sn_private import sn_gather, sn_multinomial, sn_scatter
from sambaflow.samba.utils import SNType

RNG = np.random.default_rng(0)


def np_gather(operand, indices, dims, lengths, batched):
    rest = operand.shape[batched:]
    window = list(rest)
    for d, n in zip(dims, lengths):
        window[d] = n
    lead = indices.shape[:-1]
    out = np.zeros(tuple(lead) + tuple(window), dtype=operand.dtype)
    for pos in itertools.product(*map(range, lead)):
        starts = [0] * len(rest)
        for j, d in enumerate(dims):
            starts[d] = min(max(int(indices[pos][j]), 0), rest[d] - window[d])
        for w in itertools.product(*map(range, window)):
            out[pos + w] = operand[pos[:batched] + tuple(s + x for s, x in zip(starts, w))]
    return out


def np_scatter(operand, update, indices, dims, add, batched):
    out = operand.copy()
    lead = indices.shape[:-1]
    window = update.shape[len(lead) :]
    rest = operand.shape[batched:]
    for pos in itertools.product(*map(range, lead)):
        for w in itertools.product(*map(range, window)):
            target = list(w)
            for j, d in enumerate(dims):
                target[d] += int(indices[pos][j])
            if all(0 <= t < n for t, n in zip(target, rest)):
                where = pos[:batched] + tuple(target)
                out[where] = out[where] + update[pos + w] if add else update[pos + w]
    return out


@pytest.mark.parametrize(
    "shape, indices_shape, dims, lengths, batched",
    [
        ((10, 4), (2, 3, 1), [0], [1], 0),  # RoPE tables: cos[position_ids]
        ((3, 7, 5), (3, 2, 1), [0], [1], 1),  # hidden states at the last token index
        ((2, 3, 16), (2, 3, 1, 1), [0], [1], 2),  # top-k indices
        ((6, 5, 4), (4, 2), [0, 1], [2, 3], 0),  # windows longer than 1, clamped starts
    ],
)
def test_sn_gather_matches_numpy(shape, indices_shape, dims, lengths, batched):
    operand = RNG.standard_normal(shape).astype(np.float32)
    high = max(operand.shape[batched + d] for d in dims) + 2  # some starts out of range: clamped
    indices = RNG.integers(-1, high, indices_shape).astype(np.int32)
    got = sn_gather(torch.from_numpy(operand), torch.from_numpy(indices), dims, lengths, batched_dims=batched)
    np.testing.assert_array_equal(got.numpy(), np_gather(operand, indices, dims, lengths, batched))


@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize(
    "shape, update_shape, indices_shape, dims, batched",
    [
        ((2, 3, 9, 4), (2, 1, 3, 1, 4), (2, 1, 1), [1], 1),  # KV cache at the last token index
        ((3, 11), (3, 6, 1), (3, 6, 1), [0], 1),  # token counts; index 11 is out of range: no-op
        ((5, 4), (3, 1, 1), (3, 2), [0, 1], 0),  # two scattered dims
    ],
)
def test_sn_scatter_matches_numpy(shape, update_shape, indices_shape, dims, batched, add):
    operand = RNG.standard_normal(shape).astype(np.float32)
    update = RNG.standard_normal(update_shape).astype(np.float32)
    high = max(operand.shape[batched + d] for d in dims) + 1
    if add:
        indices = RNG.integers(-1, high, indices_shape)  # duplicates add up, out of range dropped
    else:  # kUpdate with distinct targets per batch row: the result does not depend on write order
        rows, per_row = int(np.prod(indices_shape[:batched])), int(np.prod(indices_shape[batched:-1]))
        picks = [[RNG.permutation(high)[:per_row] for _ in range(indices_shape[-1])] for _ in range(rows)]
        indices = np.stack([np.stack(p, -1) for p in picks]).reshape(indices_shape)
    indices = indices.astype(np.int32)
    got = sn_scatter(
        torch.from_numpy(operand),
        torch.from_numpy(update),
        torch.from_numpy(indices),
        dims,
        rmw_op="kAdd" if add else "kUpdate",
        batched_dims=batched,
    )
    np.testing.assert_allclose(
        got.numpy(), np_scatter(operand, update, indices, dims, add, batched), rtol=1e-6
    )


def test_sn_scatter_adds_windows_longer_than_one():
    operand = RNG.standard_normal((5, 4)).astype(np.float32)
    update = RNG.standard_normal((3, 1, 2)).astype(np.float32)
    indices = RNG.integers(-1, 5, (3, 2)).astype(np.int32)
    got = sn_scatter(*map(torch.from_numpy, (operand, update, indices)), [0, 1], rmw_op="kAdd")
    np.testing.assert_allclose(got.numpy(), np_scatter(operand, update, indices, [0, 1], True, 0), rtol=1e-6)


def test_scatter_and_gather_refuse_bad_layouts():
    with pytest.raises(SambaArgumentError, match="rmw_op 'kMax' is not supported"):
        sn_scatter(
            torch.zeros(2, 3),
            torch.ones(2, 1, 1),
            torch.zeros(2, 1, 1, dtype=torch.int32),
            [0],
            "kMax",
            batched_dims=1,
        )
    with pytest.raises(SambaArgumentError, match="must be integers whose last dim"):
        sn_gather(torch.zeros(4, 3), torch.zeros(2, 2), [0], [1])
    with pytest.raises(SambaArgumentError, match=r"update shape \[2, 3, 3\] must be"):
        sn_scatter(
            torch.zeros(2, 3), torch.ones(2, 3, 3), torch.zeros(2, 1, dtype=torch.int32), [0], batched_dims=1
        )


def test_zipmapreduce_masks_match_numpy():
    last = torch.from_numpy(RNG.integers(0, 8, (3, 1)).astype(np.int32))
    mask = torch.from_numpy(RNG.integers(0, 2, (3, 8)).astype(np.int32))

    def keep_upto_last(attrs, last_index, prev_mask):  # the modelzoo's token_gen_init
        column = sn_iteridx(dim=1, attrs=attrs, dtype=SNType.INT32)
        return sn_select(column <= last_index, prev_mask, sn_imm(0, SNType.INT32))

    got = sn_zipmapreduce(keep_upto_last, [last, mask])
    expected = np.where(np.arange(8)[None, :] <= last.numpy(), mask.numpy(), 0)
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), expected)

    scores = torch.randn(2, 3, 5, 5, dtype=torch.bfloat16)

    def causal(attrs, x):  # upper_triangular_fill, torch-reference index type
        row = sn_iteridx(dim=2, attrs=attrs, dtype=SNType.to_torch_reference_type(SNType.UINT16))
        col = sn_iteridx(dim=3, attrs=attrs, dtype=SNType.to_torch_reference_type(SNType.UINT16))
        return sn_select(torch.ge(row, col), x, sn_imm(-1e9, torch.float32))

    filled = sn_zipmapreduce(causal, [scores])
    assert filled.dtype == torch.bfloat16  # a 0-d immediate does not promote the tensor
    expected = np.where(
        np.tril(np.ones((5, 5), bool)),
        scores.float().numpy(),
        torch.tensor(-1e9, dtype=torch.bfloat16).float().item(),
    )
    np.testing.assert_array_equal(filled.float().numpy(), expected)
    np.testing.assert_array_equal(samba.triu_fill(scores, -1e9).float().numpy(), expected)


def test_zipmapreduce_reduces_and_checks():
    a = torch.from_numpy(RNG.integers(0, 9, (4, 6)).astype(np.int32))
    b = torch.from_numpy(RNG.integers(0, 9, (4, 6)).astype(np.int32))

    def first_mismatch(attrs, x, y):  # the modelzoo's speculative-decoding acceptance count
        return sn_select(x == y, sn_imm(6, SNType.INT32), sn_iteridx(attrs=attrs, dim=1, dtype=SNType.INT32))

    got = sn_zipmapreduce(first_mismatch, [a, b], reduce_func="MIN", reduce_dim=[1])
    expected = np.where(a.numpy() == b.numpy(), 6, np.arange(6)[None, :]).min(axis=1, keepdims=True)
    np.testing.assert_array_equal(got.numpy(), expected)
    sums = sn_zipmapreduce(lambda attrs, x: x * 2, [a.float()], reduce_func="ADD", reduce_dim=0)
    np.testing.assert_allclose(sums.numpy(), (a.numpy() * 2).sum(0, keepdims=True))
    with pytest.raises(SambaArgumentError, match="do not broadcast"):
        sn_zipmapreduce(lambda attrs, x, y: x, [torch.zeros(2, 3), torch.zeros(4)])
    with pytest.raises(SambaArgumentError, match="cond must be a bool tensor"):
        sn_select(torch.ones(2), torch.ones(2), torch.zeros(2))
    with pytest.raises(SambaArgumentError, match="SNType member"):
        sn_imm(1, "int32")


def test_multinomial_is_the_inverse_cdf():
    probs = torch.from_numpy(RNG.random((64, 16)).astype(np.float32))
    randoms = torch.from_numpy(RNG.random((64, 1)).astype(np.float32))
    got = sn_multinomial(probs, randoms)
    cdf = np.cumsum(probs.numpy(), axis=1)
    expected = np.array(
        [np.searchsorted(c, u * c[-1], side="right") for c, u in zip(cdf, randoms.numpy()[:, 0])]
    )
    np.testing.assert_array_equal(got[:, 0].numpy(), np.minimum(expected, 15))
    assert got.shape == (64, 1) and got.dtype == torch.int64


class Ops(nn.Module):
    """Every op above in one forward, with a weight so the graph has a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, table, index, counts_index):
        rows = sn_gather(table, index.unsqueeze(-1), [0], [1]).squeeze(-2)  # [B, T, 4]
        h = self.proj(rows)
        h = sn_zipmapreduce(
            lambda attrs, x: sn_select(
                sn_iteridx(attrs, 1, SNType.INT32) >= sn_imm(1, SNType.INT32), x, sn_imm(0.5, torch.float32)
            ),
            [h],
        )
        counts = sn_scatter(
            torch.zeros(index.shape[0], 9, dtype=torch.int32),
            torch.ones(index.shape[0], 3, 1, dtype=torch.int32),
            counts_index.unsqueeze(-1),
            [0],
            "kAdd",
            batched_dims=1,
        )
        return samba.triu_fill(h @ h.transpose(1, 2), -1e4), counts


@pytest.mark.parametrize("backend", ["reference", "inductor"])
def test_the_ops_trace_compile_and_run_from_a_pef(tmp_path, backend):
    if backend == "inductor" and not torch._inductor.config.cpp.cxx:  # pragma: no cover - CI has g++
        pytest.skip("no C++ compiler")
    torch.manual_seed(0)
    gold = Ops()
    model = Ops()
    model.load_state_dict(gold.state_dict())
    samba.from_torch_model_(model)
    table = samba.randn(12, 4, name="table")
    index = samba.from_torch_tensor(torch.randint(0, 12, (2, 3), dtype=torch.int32), name="index")
    counts_index = samba.from_torch_tensor(
        torch.tensor([[1, 1, 9], [0, 8, 8]], dtype=torch.int32), name="counts_index"
    )
    inputs = (table, index, counts_index)
    path = samba.session.compile(
        model,
        inputs,
        None,
        name="ops",
        inference=True,
        backend=backend,
        config_dict={"output_folder": str(tmp_path)},
    )
    samba.session.reset()
    utils.trace_graph(model, inputs, pef=path)
    scores, counts = samba.session.run(inputs, section_types=["fwd"])
    expected_scores, expected_counts = gold(table.torch(), index.torch(), counts_index.torch())
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert (
        counts.tolist()
        == expected_counts.tolist()
        == [[0, 2, 0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0, 2]]
    )


def test_op_fusion_scopes_reenter_and_change_nothing():
    scope = op_fusion(
        func_name="encoder_ss_64", heuristic={"tiling": "kX"}, plugins=["libX.so"], user_annotated=False
    )
    assert isinstance(scope, FusionScope)
    x = torch.randn(3)
    for _ in range(2):  # the modelzoo keeps a scope and enters it once per layer
        with scope, op_fusion(func_name="inner"):
            assert active_fusion_scopes()[-2:] == ["encoder_ss_64", "inner"]
            y = x * 2
    assert scope.entered == 2 and active_fusion_scopes() == [] and torch.equal(y, x * 2)
    assert fusion_scopes()["encoder_ss_64"] == {
        "heuristic": {"tiling": "kX"},
        "plugins": ["libX.so"],
        "user_annotated": False,
    }
    with sdpa_directives({"sdp_mixed_p": True}):
        pass
    with pytest.raises(SambaArgumentError, match="keyword hints"):
        op_fusion(nn.Linear(2, 2), "Encoder", plugins=["x"])


def test_session_directives_and_aux_tensors():
    session = samba.session
    with session._add_directives({"opfusion_id": "q_proj"}):
        assert session._context_directives == {"opfusion_id": "q_proj"}
        with session._add_directives({"other": 1}):
            assert session._context_directives == {"opfusion_id": "q_proj", "other": 1}
    assert session._context_directives == {}
    cos = torch.randn(4, 2)
    session.add_aux_tensor(cos, "aux_cos_64")
    assert session.aux_tensors["aux_cos_64"] is cos and session.is_valid_aux_tensor_name("aux_sin_64")
    assert not session.is_valid_aux_tensor_name("bad name") and session.use_static_functional() is False
    with pytest.raises(SambaArgumentError, match="not a valid tensor name"):
        session.add_aux_tensor(cos, "1 bad")
    assert session.dynamic_dims == {}


def test_profiler_latencies_and_throughputs():
    profiler = Profiler()
    profiler.start_profile()
    for _ in range(3):
        profiler.end_event(profiler.start_event("fwd"))
    times = profiler._get_iter_times("fwd", 0)
    assert len(times) == 3 and profiler._get_iter_times("fwd", 1) == times[1:]
    latency = profiler.get_latencies(["fwd"], 1)["fwd"]
    assert latency == pytest.approx(sum(times[1:]) / 2)
    assert profiler.get_throughputs(["fwd"], 4, 1)["fwd"] == pytest.approx(4 / latency)
    assert profiler.get_latencies(["fwd"], 3) == {"fwd": 0.0} and profiler.get_throughputs(["other"], 4) == {
        "other": 0.0
    }
    profiler.stop_profile()
