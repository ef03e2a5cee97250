"""The benchmark suite of ``resilient``: ``python -m benchmarks [--quick] [--only NAME ...]``.

Every scenario runs against ``resilient.testing.SimulatedAPI`` on loopback and compares,
in the same run, raw aiohttp, resilient's full chain, aiohttp-retry, a tenacity loop and
a naive retry loop. Results go to ``benchmarks/results/latest/`` (report.md, results.json,
PNG plots) and a table to stdout.
"""
