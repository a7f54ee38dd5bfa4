"""Benchmarks of tidings against the shared peers: ``python -m bench --help``."""
