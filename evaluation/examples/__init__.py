"""Runnable, documented examples (python -m evaluation.examples.<name>)."""
