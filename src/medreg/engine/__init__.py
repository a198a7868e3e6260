"""Optimization engine: pyramids and the optimizer loop."""

from medreg.engine.optimize import OPTIMIZERS, OptimizationResult, OptimizerConfig, run_optimizer
from medreg.engine.pyramid import gaussian_pyramid, gaussian_smooth, smooth_image

__all__ = ["OPTIMIZERS", "OptimizationResult", "OptimizerConfig", "gaussian_pyramid",
           "gaussian_smooth", "run_optimizer", "smooth_image"]
