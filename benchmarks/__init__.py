"""Benchmarks: each module runs as ``python -m benchmarks.<name>`` from the repository root and
writes JSON (with its exact command and the machine) under ``benchmarks/results/``."""
