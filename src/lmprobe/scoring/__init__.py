"""Metrics of a probe's predictions and their uncertainty (bootstrap, p-values)."""
