"""Hyperparameter sweeps: the search space (space), the Optuna study (study), the
trial loop (sweep) and the results (report)."""
