"""`sambaflow.samba.graph`: `FwdGraph`, a traced forward graph for `session.add_graph` (multigraph)."""

from sambaflow.runtime.multigraph import FwdGraph

__all__ = ["FwdGraph"]
