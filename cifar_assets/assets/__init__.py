"""Thin Dagster asset definitions, one module per stage, calling the library code."""
