"""Speed benchmarks of got-reg (scripts, not tests). Run them from the repository root as modules, e.g.
``python -m benchmarks.bench_solvers --help``; see ``benchmarks/README.md``."""
