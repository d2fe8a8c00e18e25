"""The session runtime: a device tensor store by name and section runs."""
