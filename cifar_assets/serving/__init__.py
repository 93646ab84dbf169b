"""Serving: the Triton model repository, the server launcher, the A/B router and its traffic
capture, and small clients. Nothing here imports Dagster; heavy libraries load inside functions."""
