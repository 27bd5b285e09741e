"""torchnova benchmarks: ``python -m benchmarks --help``; conventions in ``benchmarks/harness.py``."""
