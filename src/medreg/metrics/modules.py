"""Metric modules: thin ``nn.Module`` wrappers with ``forward(fixed, warped, mask=None)``."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from medreg.metrics import functional as Fm


class Metric(nn.Module):
    """Wraps a functional metric with fixed keyword options.

    Attributes:
        name: the registry name. needs_grid: True when the metric needs a spatial layout
        (no point sampling). is_histogram: True for MI-type metrics (need intensity ranges).
    """

    def __init__(self, name: str, fn: Callable, needs_grid: bool = False,
                 is_histogram: bool = False, **options) -> None:
        super().__init__()
        self.name, self.fn, self.options = name, fn, dict(options)
        self.needs_grid, self.is_histogram = needs_grid, is_histogram

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor,
                mask: torch.Tensor | None = None, **extra) -> torch.Tensor:
        return self.fn(fixed, warped, mask, **{**self.options, **extra})

    def value_and_grad(self, fixed: torch.Tensor, warped: torch.Tensor,
                       mask: torch.Tensor | None = None, **extra
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss (detached) and its gradient with respect to ``warped`` (same shape).

        In closed form where the metric has one (:data:`CLOSED_FORM_GRADIENTS`: fused MI and
        NMI of one image pair), else by autograd through this metric alone: either way no
        graph is left behind, so a caller that chains the gradient itself (the linear
        objective) pays for no autograd graph of its own.
        """
        opts = {**self.options, **extra}
        direct = CLOSED_FORM_GRADIENTS.get(self.name)
        out = direct(fixed, warped, mask, **opts) if direct is not None else None
        if out is not None:
            return out
        with torch.enable_grad():
            leaf = warped.detach().requires_grad_()
            loss = self.fn(fixed, leaf, mask, **opts)
            if not loss.requires_grad:
                return loss.detach(), torch.zeros_like(warped)
            (grad,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), grad

    def extra_repr(self) -> str:
        return f"{self.name}, {self.options}"


#: name -> (function or "module:function", needs_grid, is_histogram)
METRICS: dict[str, tuple] = {
    "mse": (Fm.mse, False, False),
    "ssd": (Fm.mse, False, False),
    "l1": (Fm.l1, False, False),
    "ncc": (Fm.ncc, False, False),
    "lncc": (Fm.lncc, True, False),
    "mi": (Fm.mi, False, True),
    "nmi": (Fm.nmi, False, True),
    "ngf": ("medreg.deformable.metrics:ngf", True, False),
    "mind": ("medreg.deformable.metrics:mind_ssc", True, False),
}


#: name -> ``fn(fixed, warped, mask, **options)`` returning ``(loss, d loss / d warped)`` without
#: autograd, or ``None`` for inputs it does not cover (see :meth:`Metric.value_and_grad`).
CLOSED_FORM_GRADIENTS: dict[str, Callable] = {
    "mi": Fm.mi_value_and_grad,
    "nmi": Fm.nmi_value_and_grad,
}


def get_metric(name: str, **options) -> Metric:
    """Metric module by name (``mse``, ``ssd``, ``l1``, ``ncc``, ``lncc``, ``mi``, ``nmi``, ...)."""
    key = name.lower()
    if key not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    fn, needs_grid, is_hist = METRICS[key]
    if isinstance(fn, str):
        module, func = fn.split(":")
        fn = getattr(importlib.import_module(module), func)
    return Metric(key, fn, needs_grid, is_hist, **options)
