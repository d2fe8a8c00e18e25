"""The PEF file: one versioned zip of a JSON manifest, graph text, section graphs and binaries."""
