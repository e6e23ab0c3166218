"""Offline training, evaluation and export of anomalyd model bundles (needs the `train` extra: torch)."""
