"""Benchmarks for imagenet_int8_assets; run them with ``python -m benchmarks.run``."""
