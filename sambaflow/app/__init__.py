"""App-level helpers: tracing entry points, argument parsing, the common driver, measurement."""
