"""Hyperparameter search in one commit: an experiment's optional `Tuning` block.

`spec` is the block's model (light: pydantic only, used by validation and the
webhook's path); `control` is the small SQLite table that lets `mmp cancel` and
worker recovery find a study without importing Optuna; `study` runs the search
with Optuna's ask/tell interface, each trial an ordinary run through the backend.
"""
