"""lunamon's benchmarks: each script measures the peers and lunamon side by side.

Run one with ``python -m benchmarks.<name> [--quick]`` or all of them with
``python -m benchmarks.run_all`` (``make bench``), which writes
``benchmarks/RESULTS.md``. The figures to reproduce and the targets to beat are
in BENCHMARKS.md; only ratios measured in the same run are compared.
"""
