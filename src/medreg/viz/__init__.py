"""Pictures for quality control (matplotlib, Agg canvas, no display needed)."""

from medreg.viz.qc import checkerboard, difference, overlay, qc_figure

__all__ = ["checkerboard", "difference", "overlay", "qc_figure"]
