"""Benchmarks behind `marllb bench` (and `make bench`): figures go into docs/benchmarks.md, never into tests."""
