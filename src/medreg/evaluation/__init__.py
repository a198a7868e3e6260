"""Registration quality: Jacobian statistics, inverse consistency, overlap, distances, TRE."""

from medreg.evaluation.jacobian import (
    folding_percent,
    inverse_consistency,
    jacobian_map,
    jacobian_stats,
    std_log_jacobian,
)
from medreg.evaluation.overlap import dice, hausdorff95
from medreg.evaluation.points import landmark_tre

__all__ = ["dice", "folding_percent", "hausdorff95", "inverse_consistency", "jacobian_map",
           "jacobian_stats", "landmark_tre", "std_log_jacobian"]
