"""Shared helpers of the scripts: tasks.py (the continuous tasks and their environments), datasets.py (their offline
data), pointmaze.py (the embedded task's data collector), atari_data.py (the Atari environment and its data),
evaluation.py (policy evaluation)."""


class DatasetError(RuntimeError):
    """A dataset is missing, unreadable or does not fit the environment; the message says how to fix it."""
