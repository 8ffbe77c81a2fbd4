"""Evaluation: metrics (pure), policy generation and log-likelihoods, judges and win rate, multiple-choice
scoring, and the eval job (`evaluate.run`, `configs/eval.py`)."""
