"""The manifest's view of a traced graph: tensor specs, sections, fingerprint."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sambaflow.pef.codec import dtype_from_name, dtype_name, encode_graph
from sambaflow.trace.graph import TensorSpec, TracedGraph

FORMAT = "sambaflow-pef"
#: 2: members record sizes, the manifest its own checksum, graph members their programs' wiring.
#: 3: the manifest records the step's precision (fp32, bf16, bf16-mixed: trace/precision.py).
FORMAT_VERSION = 3


def spec_to_json(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "role": spec.role,
        "shape": list(spec.shape),
        "dtype": dtype_name(spec.dtype),
        "batch_dim": spec.batch_dim,
    }


def spec_from_json(entry: dict[str, Any]) -> TensorSpec:
    return TensorSpec(
        entry["name"],
        entry["role"],
        tuple(entry["shape"]),
        dtype_from_name(entry["dtype"]),
        entry.get("batch_dim"),
    )


def fingerprint(graph: TracedGraph) -> str:
    """Hash of the step's computation as the app traces it, and its named inputs and outputs."""
    graph = graph.origin or graph
    payload = {
        "graph": encode_graph(graph.module),
        "inputs": [spec_to_json(s) for s in graph.inputs],
        "outputs": [spec_to_json(s) for s in graph.outputs],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def graph_entry(graph: TracedGraph) -> dict[str, Any]:
    """Manifest entry of one graph (programs are added by the writer)."""
    return {
        "inputs": [spec_to_json(s) for s in graph.inputs],
        "outputs": [spec_to_json(s) for s in graph.outputs],
        "sections": list(graph.sections),
        "loss_names": list(graph.loss_names),
        "hyper_defaults": dict(graph.hyper_defaults),
        "baked": list(graph.baked),
        "fingerprint": fingerprint(graph),
        "node_count": len(graph.module.graph.nodes),
    }


def graph_from_entry(entry: dict[str, Any], module: Any) -> TracedGraph:
    return TracedGraph(
        module,
        [spec_from_json(s) for s in entry["inputs"]],
        [spec_from_json(s) for s in entry["outputs"]],
        list(entry["sections"]),
        list(entry["loss_names"]),
        dict(entry["hyper_defaults"]),
        list(entry["baked"]),
    )
