"""sambaflow-open: the SambaFlow programming model on CPUs and GPUs.

The public API lives under `sambaflow.samba` (SambaFlow's own import paths); the stage packages
(`tensors`, `trace`, `passes`, `backends`, `pef`, `runtime`, `app`) hold the implementation.
"""

__version__ = "0.1.0"
