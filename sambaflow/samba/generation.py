"""`sambaflow.samba.generation`: cached generation compiled ahead of time (see app/generation.py).

cached = KVCacheLM(lm, batch_size=1, max_seq_length=128)
samba.from_torch_model_(cached)
samba.session.compile(cached, cached_graph_inputs(cached, prompt_length=64), None)  # prompt + token graphs
utils.trace_graph(cached, cached_graph_inputs(cached, 64), pef=path)
new_tokens = CachedGenerator(cached).generate([prompt_ids], max_new_tokens=32)
"""

from sambaflow.app.generation import CachedGenerator, Sampling, cached_graph_inputs
from sambaflow.models.kv_cache import KVCacheLM

__all__ = ["CachedGenerator", "KVCacheLM", "Sampling", "cached_graph_inputs"]
