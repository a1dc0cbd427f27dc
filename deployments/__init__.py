"""Prefect deployments of the scoring flow: ``prefect.yaml`` (scheduled and ad-hoc runs on a
process work pool) and :mod:`deployments.serve`, which serves the same deployments from one
process on one host without a work pool."""
