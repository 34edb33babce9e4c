"""Micro-benchmarks for evaluation code (run as ``python -m ...``)."""
