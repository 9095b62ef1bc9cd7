"""Benchmarks run by hand; their figures go in the README."""
