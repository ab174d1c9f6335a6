"""Benchmarks: speed (bench.py), selection quality (quality.py), a lost cluster node (cluster.py)."""
