"""Drift detection and A/B statistics, as plain library code (no Dagster).

``detectors`` wraps the statistical tests behind the project's own interface (alibi-detect, BSL
1.1, stays replaceable there); ``baseline`` fits and stores them per model version; ``report``
checks one batch and gives the verdict; ``incoming`` finds and reads production batches;
``ab_stats`` analyses an A/B test of two served versions. Import the submodules directly: this
package imports nothing heavy, so the Dagster definitions can reference it cheaply.
"""
