"""Data sources, the canonical image-set form, validation statistics and the feature store.

Library code: nothing here imports Dagster.
"""
