"""kimi-syncd benchmarks: `python -m bench` (full, a few minutes) or `python -m bench --quick`."""
