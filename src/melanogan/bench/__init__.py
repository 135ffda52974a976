"""Benchmarks (`melanogan bench ...`): performance figures live here, never in timed tests."""
