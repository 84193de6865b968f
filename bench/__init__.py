"""Benchmarks and the chaos run: commands that measure, not tests that time.

``python -m bench chaos`` · ``python -m bench throughput`` · ``python -m bench enqueue`` ·
``python -m bench reconciler``
"""
