"""Benchmarks: figures recorded against a named peer in the same run (see bench/README.md)."""
