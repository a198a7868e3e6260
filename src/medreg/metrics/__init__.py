"""Similarity metrics (losses: lower is better)."""

from medreg.metrics import functional
from medreg.metrics.modules import METRICS, Metric, get_metric

__all__ = ["METRICS", "Metric", "functional", "get_metric"]
