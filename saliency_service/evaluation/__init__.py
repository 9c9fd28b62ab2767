"""Quantified explainability: synthetic cells with ground truth, metrics, sanity checks, ROAD and
the evaluation report."""
