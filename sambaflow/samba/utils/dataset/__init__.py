"""Dataset helpers SambaFlow apps import (`sambaflow.samba.utils.dataset.mnist`)."""
