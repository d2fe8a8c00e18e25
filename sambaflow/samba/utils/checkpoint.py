"""`sambaflow.samba.utils.checkpoint`: load a Hugging Face checkpoint into a converted model."""

from sambaflow.app.hf_checkpoint import load_sharded_checkpoint

__all__ = ["load_sharded_checkpoint"]
