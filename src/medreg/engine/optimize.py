"""The optimizer loop: injected optimizer, convergence tests, history, callbacks, progress.

A *solver* for one level calls :func:`run_optimizer` with a loss closure; the coarse-to-fine
loop lives elsewhere and passes the solver in (scikit-image's ``_coarse_to_fine`` split).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from medreg.errors import MedregError

OPTIMIZERS = ("adam", "lbfgs", "gd")


@dataclass(frozen=True)
class OptimizerConfig:
    """How to optimize one level.

    Attributes:
        name: ``adam``, ``lbfgs`` or ``gd`` (gradient descent with momentum 0.9).
        lr: step size in scaled parameter units (~mm for linear transforms).
        max_iter: iteration limit.
        tol: convergence when the relative loss improvement over ``patience`` iterations is
            below ``tol``.
        patience: window of iterations for the convergence test.
        gtol: stop when the gradient norm falls below this (0 disables).
        lr_decay: multiply the step size by this each iteration (Adam/GD).
        average: stochastic mode (Adam/GD): run all ``max_iter`` iterations (no loss-based
            stop, since the loss is noisy), halve the step for the last ``average`` fraction of
            them and return the mean of those iterates (Polyak-Ruppert averaging), instead of
            the best iterate. 0 (default) keeps the deterministic behaviour.
    """

    name: str = "adam"
    lr: float = 0.5
    max_iter: int = 200
    tol: float = 1e-5
    patience: int = 10
    gtol: float = 0.0
    lr_decay: float = 1.0
    average: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; choose from "
                             f"{', '.join(OPTIMIZERS)}")
        if self.max_iter < 1 or self.lr <= 0 or self.patience < 1:
            raise ValueError(f"optimizer needs max_iter >= 1, lr > 0, patience >= 1: {self}")
        if not 0.0 <= self.average < 1.0 or (self.average and self.name == "lbfgs"):
            raise ValueError(f"average must be in [0, 1) and needs adam or gd: {self}")


@dataclass
class OptimizationResult:
    """History and the recorded reason for stopping."""

    history: list[float] = field(default_factory=list)
    stop_reason: str = ""
    iterations: int = 0
    best_loss: float = math.inf


class _Stepper:
    """Adam or Nesterov-momentum descent on a few leaf tensors.

    Written out (a dozen lines) rather than taken from ``torch.optim``, whose first use imports
    TorchDynamo: several seconds that a short registration cannot afford.
    """

    def __init__(self, params: list[torch.Tensor], cfg: OptimizerConfig) -> None:
        self.params, self.cfg, self.lr, self.t = params, cfg, cfg.lr, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2, eps = 0.9, 0.999, 1e-8
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if self.cfg.name == "adam":  # p -= lr * m_hat / (sqrt(v_hat) + eps), in place
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = v.sqrt().div_(math.sqrt(1 - b2**self.t)).add_(eps)
                p.addcdiv_(m, denom, value=-self.lr / (1 - b1**self.t))
            else:  # gradient descent with Nesterov momentum 0.9
                m.mul_(0.9).add_(g)
                p.sub_(self.lr * (g + 0.9 * m))
        self.lr *= self.cfg.lr_decay


def _run_scipy_lbfgs(params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor],
                     cfg: OptimizerConfig, callback, progress: bool, desc: str
                     ) -> OptimizationResult:
    """L-BFGS-B from SciPy on the flattened parameters (float64), gradients from autograd."""
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def assign(x: np.ndarray) -> None:
        with torch.no_grad():
            for p, chunk in zip(params, np.split(x, np.cumsum(sizes)[:-1]), strict=True):
                p.copy_(torch.as_tensor(chunk, dtype=p.dtype).reshape(p.shape))

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        assign(x)
        for p in params:
            p.grad = None
        loss = loss_fn()
        if not torch.isfinite(loss):
            raise MedregError(f"the metric became {float(loss)} during optimization "
                              f"(check for NaN voxels, empty masks or no image overlap)")
        loss.backward()
        grad = np.concatenate([(p.grad if p.grad is not None else torch.zeros(s)).detach()
                               .double().cpu().reshape(-1).numpy()
                               for p, s in zip(params, shapes, strict=True)])
        return float(loss.detach()), grad

    result = OptimizationResult()
    bar = progress_bar(cfg.max_iter, desc, progress)

    def on_iter(intermediate_result) -> None:
        loss = float(intermediate_result.fun)
        result.history.append(loss)
        bar.update(1)
        if callback is not None:
            callback(len(result.history) - 1, loss)

    from scipy.optimize import minimize  # imported on use: 26 MB that deformable runs skip

    x0 = np.concatenate([p.detach().double().cpu().reshape(-1).numpy() for p in params])
    try:
        res = minimize(fun, x0, jac=True, method="L-BFGS-B", callback=on_iter,
                       options=dict(maxiter=cfg.max_iter, ftol=cfg.tol, gtol=cfg.gtol or 1e-9,
                                    maxcor=20))
    finally:
        bar.close()
    assign(res.x)
    result.best_loss = float(res.fun)
    result.iterations = int(res.nit)
    msg = res.message.decode() if isinstance(res.message, bytes) else str(res.message)
    result.stop_reason = (f"reached the iteration limit ({cfg.max_iter})"
                          if res.nit >= cfg.max_iter else f"L-BFGS-B: {msg.lower()}")
    return result


def _converged(history: list[float], cfg: OptimizerConfig) -> bool:
    if len(history) <= cfg.patience:
        return False
    old, new = history[-cfg.patience - 1], min(history[-cfg.patience:])
    return (old - new) <= cfg.tol * max(abs(old), 1e-12)


def run_optimizer(params: Sequence[torch.Tensor], loss_fn: Callable[[], torch.Tensor],
                  config: OptimizerConfig = OptimizerConfig(), *,
                  callback: Callable[[int, float], None] | None = None,
                  progress: bool = False, desc: str = "") -> OptimizationResult:
    """Minimize ``loss_fn()`` over ``params``; the best parameters seen are restored at the end
    (with ``config.average``, the mean of the last iterates instead).

    Args:
        params: leaf tensors with ``requires_grad``.
        loss_fn: recomputes the scalar loss from the current parameters.
        callback: ``callback(iteration, loss)`` after every iteration.

    Returns:
        :class:`OptimizationResult` with the loss history and the stop reason.
    """
    params = list(params)
    if config.name == "lbfgs":
        return _run_scipy_lbfgs(params, loss_fn, config, callback, progress, desc)
    if config.average:
        return _run_averaged(params, loss_fn, config, callback, progress, desc)
    stepper = _Stepper(params, config)
    result = OptimizationResult()
    best = [p.detach().clone() for p in params]
    bar = progress_bar(config.max_iter, desc, progress)
    try:
        for it in range(config.max_iter):
            loss = _loss_and_grad(params, loss_fn)
            result.history.append(loss)
            if loss < result.best_loss:
                result.best_loss, best = loss, [p.detach().clone() for p in params]
            stepper.step()
            _report(bar, callback, it, loss)
            reason = _stop_reason(result.history, params, config)
            if reason:
                result.stop_reason = reason
                break
        else:
            result.stop_reason = f"reached the iteration limit ({config.max_iter})"
    finally:
        bar.close()
    with torch.no_grad():
        for p, b in zip(params, best, strict=True):
            p.copy_(b)
    result.iterations = len(result.history)
    return result


def _loss_and_grad(params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor]) -> float:
    """Evaluate the loss, check it is finite, and fill the parameters' ``.grad``."""
    for p in params:
        p.grad = None
    loss_t = loss_fn()
    loss = float(loss_t.detach())
    if not math.isfinite(loss):
        raise MedregError(f"the metric became {loss} during optimization "
                          f"(check for NaN voxels, empty masks or no image overlap)")
    loss_t.backward()
    return loss


class _NoBar:
    """What :func:`progress_bar` returns when it is off: every call does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool):
    """A ``tqdm.auto`` bar, or a no-op stand-in when ``enabled`` is false. ``tqdm.auto`` is
    imported only here: its notebook detection takes about 0.15 s, which a registration
    without a progress bar should not pay."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def _report(bar, callback, it: int, loss: float) -> None:
    bar.update(1)
    if not isinstance(bar, _NoBar):  # formatting the loss costs a little each iteration
        bar.set_postfix(loss=f"{loss:.5g}")
    if callback is not None:
        callback(it, loss)


def _run_averaged(params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor],
                  cfg: OptimizerConfig, callback, progress: bool, desc: str
                  ) -> OptimizationResult:
    """Stochastic Adam/GD with a fixed iteration count and Polyak-Ruppert averaging."""
    stepper = _Stepper(params, cfg)
    result = OptimizationResult()
    start = int(round(cfg.max_iter * (1.0 - cfg.average)))
    total = [torch.zeros_like(p) for p in params]
    bar = progress_bar(cfg.max_iter, desc, progress)
    try:
        for it in range(cfg.max_iter):
            if it == start:
                stepper.lr *= 0.5
            loss = _loss_and_grad(params, loss_fn)
            result.history.append(loss)
            stepper.step()
            if it >= start:
                for acc, p in zip(total, params, strict=True):
                    acc.add_(p.detach())
            _report(bar, callback, it, loss)
    finally:
        bar.close()
    with torch.no_grad():
        for acc, p in zip(total, params, strict=True):
            p.copy_(acc / (cfg.max_iter - start))
    result.best_loss = float(np.mean(result.history[start:]))
    result.iterations = cfg.max_iter
    result.stop_reason = (f"stochastic schedule done: {cfg.max_iter} iterations, mean of the last "
                          f"{cfg.max_iter - start} iterates")
    return result


def _stop_reason(history: list[float], params: list[torch.Tensor], cfg: OptimizerConfig) -> str:
    if _converged(history, cfg):
        return (f"converged: loss improved by less than {cfg.tol:g} (relative) over "
                f"{cfg.patience} iterations")
    if cfg.gtol > 0:
        gnorm = math.sqrt(sum(float((p.grad**2).sum()) for p in params if p.grad is not None))
        if gnorm < cfg.gtol:
            return f"converged: gradient norm {gnorm:.3g} < {cfg.gtol:g}"
    return ""
