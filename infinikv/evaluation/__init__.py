"""Evaluation tasks shared by the tests and the benchmarks."""
