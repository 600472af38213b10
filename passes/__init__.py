"""Graph passes of the cggr backend, one per file (installed as cggr_compile.passes)."""
