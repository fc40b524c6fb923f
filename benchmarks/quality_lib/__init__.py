"""Building blocks of `benchmarks/quality.py`: settings, the compression methods, measuring, caching, reporting."""
