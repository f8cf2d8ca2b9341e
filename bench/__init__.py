"""Benchmarks for irisnode; ``python -m bench`` runs the relay benchmark (``bench/relay_bench.py``)."""
