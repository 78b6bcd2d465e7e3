"""Benchmarks: a serving load generator (`bench serve`) and device throughput (`bench device`)."""
