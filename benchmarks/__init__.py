"""Benchmarks: one script per question, each printing a table and writing ``results/<name>.json``.

Run them all with ``python -m benchmarks.run_all`` (``make bench``); every script takes
``--quick`` for a fast smoke run.
"""
