"""Model-side building blocks that apps put around their models before tracing (a KV cache)."""
