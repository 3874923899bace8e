"""Dagster wiring only: assets, checks, resources, jobs. The work lives in the library modules."""
