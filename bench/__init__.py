"""Benchmarks: each prints its figure against a peer measured in the same run."""
