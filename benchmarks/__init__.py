"""Benchmarks: `python -m benchmarks.<name>`; JSON results go to bench-results/ (not committed)."""
