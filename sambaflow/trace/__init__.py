"""Whole-step tracing: forward, backward and optimizer update as one graph of ATen ops."""
