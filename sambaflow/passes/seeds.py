"""Specialise the fused step for the usual output-gradient seeds: zero for outputs such as logits.

A traced step takes one seed per differentiable output (`<output>__grad`) and backward adds it to
that output's gradient. In the usual step only the losses are seeded (with one); the logits' seed
is zero. Fed as an input, that zero is a real tensor the size of the logits (103 MB for GPT-2 with
a 50257-token vocabulary and 512 tokens), held in the store and read and added every step. This
pass makes chosen seeds (`runtime.executable.zero_seeds`: all but the losses') constant zeros
inside the program, so `add(seed, g)` becomes `g` and the seed is no longer an input. A run that
gives a non-zero seed for such an output (`grad_of_outputs`, `out.sn_grad`) then runs the section
programs, which keep every seed as an input. A micro-batched step's slices of such a seed are zero
too.
"""

from __future__ import annotations

import torch
from torch import fx

from sambaflow.passes.sections import SectionProgram

aten = torch.ops.aten


def zero_seeded(program: SectionProgram, seeds: list[str]) -> SectionProgram:
    """A copy of `program` in which the inputs named in `seeds` are zeros, not inputs."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    returned = graph.graph_copy(program.module.graph, env)
    graph.output(returned)
    placeholders = [env[n] for n in program.module.graph.nodes if n.op == "placeholder"]
    kept = []
    for name, node in zip(program.inputs, placeholders):
        if name in seeds:
            _replace_with_zeros(graph, node)
        else:
            kept.append(name)
    graph.eliminate_dead_code()
    module = fx.GraphModule(program.module, graph)
    return SectionProgram(program.name, module, kept, list(program.outputs))


def _replace_with_zeros(graph: fx.Graph, seed: fx.Node) -> None:
    value = seed.meta["val"]
    for user in list(seed.users):
        if user.target is aten.slice.Tensor and user.args[0] is seed:
            _replace_with_zeros(graph, user)  # a micro-batch's part of a zero seed is zero too
            continue
        other = _other_addend(user, seed)
        if other is not None and _same_result(user, other):
            user.replace_all_uses_with(other)  # g + 0 is g
            graph.erase_node(user)
    if seed.users:  # used some other way: a constant zero tensor of the seed's layout
        with graph.inserting_before(seed):
            zeros = graph.call_function(
                aten.zeros.default, (list(value.shape),), {"dtype": value.dtype, "device": value.device}
            )
        zeros.meta = {"val": value, "section": "bckwd"}
        seed.replace_all_uses_with(zeros)
    graph.erase_node(seed)


def _other_addend(node: fx.Node, seed: fx.Node) -> fx.Node | None:
    if node.target is not aten.add.Tensor or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    other = b if a is seed else a if b is seed else None
    return other if isinstance(other, fx.Node) and other is not seed else None


def _same_result(node: fx.Node, other: fx.Node) -> bool:
    """`other` can stand for `node`: same shape and dtype (no broadcast, no type promotion)."""
    mine, theirs = node.meta.get("val"), other.meta.get("val")
    return (
        isinstance(mine, torch.Tensor)
        and isinstance(theirs, torch.Tensor)
        and mine.shape == theirs.shape
        and mine.dtype == theirs.dtype
    )
