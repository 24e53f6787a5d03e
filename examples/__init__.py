"""Training and evaluation examples of got-reg (see examples/README.md).

A package so that its scripts import each other by name; run them from the repository root as
``python -m examples.main``, ``python -m examples.train_trades ...``, ``python -m examples.evaluate RUN``.
"""
