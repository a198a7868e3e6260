"""Image similarity metrics as pure functions. Every function returns a *loss*: lower is better.

Shapes:
    ``fixed``, ``warped``: ``(N, C, *P)`` where ``*P`` is a spatial shape or a flat list of
    sampled points; ``mask``: ``(N, 1, *P)`` weights in [0, 1] (or ``None`` = all ones).
    ``lncc`` needs a spatial layout (``*P`` = ``([D,] H, W)``).

Masked averages use the mask as weights; an empty mask raises ``MedregError``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medreg.errors import MedregError

_EPS = 1e-8


def _weights(fixed: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 1, *P)`` weights and their ``(N, 1)`` sums; checks the mask is not empty."""
    if mask is None:
        w = torch.ones_like(fixed[:, :1])
    else:
        w = mask.to(fixed.dtype)
        if w.shape[2:] != fixed.shape[2:]:
            raise MedregError(f"mask shape {tuple(w.shape)} does not match image "
                              f"{tuple(fixed.shape)}")
    total = w.flatten(2).sum(-1)
    if bool((total <= 0).any()):
        raise MedregError("the mask (or the overlap of the images) is empty: no voxel to compare")
    return w, total


def _wmean(x: torch.Tensor, w: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Weighted mean over points: ``(N, C, *P)`` -> ``(N, C)``."""
    return (x * w).flatten(2).sum(-1) / total


def mse(fixed: torch.Tensor, warped: torch.Tensor,
        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference (SSD / number of voxels)."""
    w, total = _weights(fixed, mask)
    return _wmean((fixed - warped) ** 2, w, total).mean()


def l1(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute difference."""
    w, total = _weights(fixed, mask)
    return _wmean((fixed - warped).abs(), w, total).mean()


def ncc(fixed: torch.Tensor, warped: torch.Tensor,
        mask: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - NCC``: global normalized cross-correlation (0 for a perfect linear match)."""
    w, total = _weights(fixed, mask)
    fm = _wmean(fixed, w, total)
    wm = _wmean(warped, w, total)
    shape = fm.shape + (1,) * (fixed.ndim - 2)
    fc, wc = fixed - fm.reshape(shape), warped - wm.reshape(shape)
    cov = _wmean(fc * wc, w, total)
    var_f = _wmean(fc * fc, w, total)
    var_w = _wmean(wc * wc, w, total)
    return (1.0 - cov / torch.sqrt(var_f * var_w + _EPS)).mean()


def box_filter(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Local mean over a ``window`` (voxels per tensor spatial axis, odd) of ``(N, C, *S)``.

    Separable: one 1D average pass per axis; zero padding with exact border counts.
    """
    ndim = x.ndim - 2
    out = x
    ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    count = ones
    for axis, k in enumerate(window):
        if k <= 1:
            continue
        kshape = [1] * ndim
        kshape[axis] = k
        kernel = torch.ones((1, 1, *kshape), dtype=x.dtype, device=x.device)
        pad = [0] * ndim
        pad[axis] = k // 2
        conv = F.conv3d if ndim == 3 else F.conv2d
        c = out.shape[1]
        out = conv(out, kernel.expand(c, 1, *kshape), padding=tuple(pad), groups=c)
        count = conv(count, kernel, padding=tuple(pad))
    return out / count


def lncc(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None,
         window: Sequence[int] | int = 9) -> torch.Tensor:
    """``1 - mean(local CC^2)`` over windows of ``window`` voxels (per tensor axis, odd).

    Squared local correlation as in ANTs' CC metric: invariant to local affine intensity
    changes, including inverted contrast.
    """
    ndim = fixed.ndim - 2
    win = (window,) * ndim if isinstance(window, int) else tuple(window)
    if len(win) != ndim or any(k < 1 or k % 2 == 0 for k in win):
        raise MedregError(f"LNCC window must be {ndim} odd positive sizes, got {window}")
    w, total = _weights(fixed, mask)
    mu_f, mu_w = box_filter(fixed, win), box_filter(warped, win)
    var_f = box_filter(fixed * fixed, win) - mu_f**2
    var_w = box_filter(warped * warped, win) - mu_w**2
    cov = box_filter(fixed * warped, win) - mu_f * mu_w
    cc2 = cov * cov / (var_f.clamp_min(0) * var_w.clamp_min(0) + 1e-5)
    return (1.0 - _wmean(cc2, w, total)).mean()


def _parzen_sparse(values: torch.Tensor, bins: int, lo: float, hi: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cubic B-spline Parzen weights of ``(N, n)`` intensities on ``bins`` bins.

    Each value touches 4 consecutive bins. Returns ``(index, weight)``, both ``(N, n, 4)``;
    the weights of one value sum to 1.
    """
    pad = 2
    scale = (bins - 1 - 2 * pad) / max(hi - lo, 1e-12)
    pos = (values.clamp(lo, hi) - lo) * scale + pad  # in [pad, bins - 1 - pad]
    base = torch.floor(pos.detach()).clamp(pad, bins - 1 - pad)
    t = pos - base  # in [0, 1]
    w = _cubic_weights(t.reshape(-1))[0].reshape(*t.shape, 4)
    idx = base.long()[..., None] + torch.arange(-1, 3, device=values.device)
    return idx.clamp(0, bins - 1), w


def _parzen_box(values: torch.Tensor, bins: int, lo: float, hi: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-order (nearest-bin) window, Mattes' choice for the fixed image: ``(N, n, 1)`` each."""
    pad = 2
    scale = (bins - 1 - 2 * pad) / max(hi - lo, 1e-12)
    pos = values.detach().clamp(lo, hi).mul_(scale).add_(pad - lo * scale)  # [pad, bins-1-pad]
    return pos.round_().long()[..., None], torch.ones_like(values)[..., None]


def _fixed_window(name: str):
    if name == "box":
        return _parzen_box
    if name == "bspline":
        return _parzen_sparse
    raise MedregError(f"unknown fixed-image Parzen window {name!r}; choose box or bspline")


def joint_histogram(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None,
                    bins: int = 32, fixed_range: tuple[float, float] | None = None,
                    moving_range: tuple[float, float] | None = None,
                    fixed_window: str = "box") -> torch.Tensor:
    """Parzen-window joint probability (Mattes): ``(N, bins, bins)``, rows = fixed bins.

    Uses the first channel: a cubic B-spline window on the moving image and, as in Mattes et
    al., a zero-order (box) window on the fixed image (``fixed_window="bspline"`` for a cubic
    one), accumulated sparsely. Intensity ranges default to each input's min/max (detached);
    pass fixed ranges during an optimization so the binning does not move.
    """
    if bins < 8:
        raise MedregError(f"mutual information needs at least 8 bins, got {bins}")
    w, total = _weights(fixed, mask)
    n = fixed.shape[0]
    f = fixed[:, 0].reshape(n, -1)
    m = warped[:, 0].reshape(n, -1)
    wt = w[:, 0].reshape(n, -1)
    fr = fixed_range or (float(f.min()), float(f.max()))
    mr = moving_range or (float(m.detach().min()), float(m.detach().max()))
    fi, fw = _fixed_window(fixed_window)(f, bins, *fr)
    mi_, mw = _parzen_sparse(m, bins, *mr)
    pair_w = (fw * wt[..., None])[..., :, None] * mw[..., None, :]  # (N, n, 4, 4)
    pair_i = fi[..., :, None] * bins + mi_[..., None, :]
    pair_i = pair_i + (torch.arange(n, device=f.device) * bins * bins).reshape(n, 1, 1, 1)
    joint = torch.zeros(n * bins * bins, dtype=pair_w.dtype, device=pair_w.device)
    joint = joint.index_add(0, pair_i.reshape(-1), pair_w.reshape(-1))
    return joint.reshape(n, bins, bins) / total[:, :, None]


def _entropies(joint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = joint.clamp_min(_EPS)
    pf = joint.sum(2).clamp_min(_EPS)
    pm = joint.sum(1).clamp_min(_EPS)
    h_fm = -(joint * p.log()).sum((1, 2))
    h_f = -(pf * pf.log()).sum(1)
    h_m = -(pm * pm.log()).sum(1)
    return h_f, h_m, h_fm


def _parzen_forward(m, f, wt, bins, fr, mr, normalized, fixed_window, regions=None,
                    n_regions=1, fixed_rows=None) -> tuple[torch.Tensor, tuple]:
    """``-MI`` or ``-NMI`` of ``(n,)`` moving values ``m`` against fixed values ``f`` with point
    weights ``wt``, and what :func:`_parzen_grad` needs for ``dL/dm``.

    Same estimate as :func:`joint_histogram` + :func:`_entropies`, in fewer operations; the
    gradient gathers ``dL/dp`` at the 16 bin pairs of each point instead of replaying an
    autograd graph, which makes the metric several times faster for linear registration.
    """
    pad = 2
    rows0, fw = fixed_rows if fixed_rows is not None else \
        parzen_fixed_rows(f, bins, fr, fixed_window, regions)
    fw = fw * wt[:, None]  # (n, k): fixed-window weights times the point weights
    scale = (bins - 1 - 2 * pad) / max(mr[1] - mr[0], 1e-12)
    pos = m.clamp(*mr)
    dpos = (pos == m).to(m.dtype).mul_(scale)  # d pos / d m: 0 where clamped
    pos = pos.mul_(scale).add_(pad - mr[0] * scale)
    base = torch.floor(pos).clamp_(pad, bins - 1 - pad)
    mw, dmw = _cubic_weights(pos - base)
    # bins base-1 .. base+2 of the moving window (base is clamped so all are valid): each
    # (point, fixed bin) adds a row of 4 weights at flat bin ``first``; rows are added
    # whole, then each flat bin sums its 4 overlapping rows (fewer, contiguous writes)
    first = (rows0 + (base.long() - 1)[:, None]).reshape(-1)  # (n * k,)
    total = wt.sum()
    if not float(total) > 0:
        raise MedregError("the mask (or the overlap of the images) is empty: no voxel to "
                          "compare")
    nb = n_regions * bins * bins
    # rows live in a buffer with 3 zero rows either side; the flat bin j gathers
    # rows[j - k, k] (k = 0..3), i.e. buffer element 4 j + 3 k' + 3 with k' = 3 - k: one
    # strided view summed along k', instead of four shifted additions
    padded = torch.zeros(nb + 6, 4, dtype=m.dtype, device=m.device)
    padded[3:3 + nb].index_add_(0, first, (fw[:, :, None] * mw[:, None, :]).reshape(-1, 4))
    joint = padded.as_strided((nb, 4), (4, 3), padded.storage_offset() + 3).sum(1)
    joint = (joint / total).reshape(n_regions, bins, bins)
    # entropies from the logs the gradient needs anyway (as _entropies, fewer operations);
    # with regions R: H(F,R), H(M,R), H(F,M,R); I(F;M|R) = H(F,R) + H(M,R) - H(F,M,R) - H(R)
    logp = joint.clamp_min(_EPS).log()
    pf, pm = joint.sum(2).clamp_min(_EPS), joint.sum(1).clamp_min(_EPS)
    logpm = pm.log()
    h_fm = -(joint * logp).sum()
    h_f = -(pf * pf.log()).sum()
    h_m = -(pm * logpm).sum()
    if n_regions > 1:
        pr = joint.sum((1, 2)).clamp_min(_EPS)
        h_r = -(pr * pr.log()).sum()
        h_f, h_m, h_fm = h_f - h_r, h_m - h_r, h_fm - h_r  # conditional entropies
    if normalized:  # d(-NMI)/dp up to constants along the moving-bin axis
        grad_p = (h_fm * logpm[:, None, :] - (h_f + h_m) * logp) / (h_fm * h_fm)
        loss = -(h_f + h_m) / h_fm
    else:  # d(-MI)/dp, same convention
        grad_p = -(logp - logpm[:, None, :])
        loss = -(h_f + h_m - h_fm)
    return loss, (grad_p.reshape(-1), first, fw, dmw, dpos, total)


def _parzen_grad(saved: tuple) -> torch.Tensor:
    """``(n,)`` ``dL/dm`` from what :func:`_parzen_forward` returned."""
    grad_p, first, fw, dmw, dpos, total = saved
    # dL/dp at bins first .. first+3 of each row: one gather of 4 contiguous values
    padded = torch.cat([grad_p, grad_p.new_zeros(3)])
    windows = padded.as_strided((grad_p.numel(), 4), (1, 1))
    g = windows.index_select(0, first).reshape(fw.shape[0], fw.shape[1], 4)
    return ((fw[:, :, None] * g).sum(1) * dmw).sum(1) * dpos / total


class _FusedParzen(torch.autograd.Function):
    """``-MI`` or ``-NMI`` of one image pair with a hand-written backward (moving side only):
    :func:`_parzen_forward` and :func:`_parzen_grad`."""

    @staticmethod
    def forward(ctx, m, f, wt, bins, fr, mr, normalized, fixed_window,  # noqa: D102
                regions=None, n_regions=1, fixed_rows=None):
        loss, saved = _parzen_forward(m, f, wt, bins, fr, mr, normalized, fixed_window, regions,
                                      n_regions, fixed_rows)
        ctx.save_for_backward(*saved)
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        gm = _parzen_grad(ctx.saved_tensors)
        return grad_out * gm, None, None, None, None, None, None, None, None, None, None


#: Histogram bins and fixed-image Parzen window of :func:`mi` and :func:`nmi` by default.
MI_BINS, FIXED_WINDOW = 32, "box"


def parzen_fixed_rows(fixed: torch.Tensor, bins: int, fixed_range: tuple[float, float],
                      fixed_window: str = FIXED_WINDOW, regions: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed side of the fused joint histogram of ``(P,)`` fixed values.

    Returns ``(rows, weights)``, both ``(P, k)`` (``k`` = 1 for the box window, 4 for the cubic
    one): the flat index ``(region * bins + fixed bin) * bins`` of each point's histogram rows
    and the fixed window's weights. They depend on the fixed values alone, so a caller that
    reuses a point set (the linear stage's pooled batches) computes them once per set and
    passes them to :func:`mi` / :func:`nmi` as ``fixed_rows``, with the same ``bins``,
    ``fixed_range``, ``fixed_window`` and region ids.
    """
    fi, fw = _fixed_window(fixed_window)(fixed[None], bins, *fixed_range)
    fi = fi[0] if regions is None else fi[0] + (regions * bins)[:, None]
    return fi * bins, fw[0]


#: Cubic B-spline weights of bins ``base-1 .. base+2`` as polynomials in ``t``: row k holds
#: the coefficients of ``t**k``; ``_CUBIC_D`` holds those of their derivatives.
_CUBIC = torch.tensor([[1.0, 4.0, 1.0, 0.0], [-3.0, 0.0, 3.0, 0.0], [3.0, -6.0, 3.0, 0.0],
                       [-1.0, 3.0, -3.0, 1.0]], dtype=torch.float64) / 6.0
_CUBIC_D = torch.tensor([[-3.0, 0.0, 3.0, 0.0], [6.0, -12.0, 6.0, 0.0],
                         [-3.0, 9.0, -9.0, 3.0]], dtype=torch.float64) / 6.0
_CUBIC32, _CUBIC_D32 = _CUBIC.float(), _CUBIC_D.float()


def _cubic_weights(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cubic B-spline weights of bins ``base-1 .. base+2`` and their derivatives: ``(n, 4)``.

    ``t`` in [0, 1] is the position past ``base``; the weights sum to 1, the derivatives to 0.
    Two small matrix products keep the number of tensor operations (the cost at a few
    thousand points) low.
    """
    t2 = t * t
    powers = torch.stack([torch.ones_like(t), t, t2, t2 * t], dim=-1)  # (n, 4)
    if t.dtype == torch.float32 and t.device.type == "cpu":
        c, d = _CUBIC32, _CUBIC_D32  # the common case: no conversion per call
    else:
        c, d = _CUBIC.to(t), _CUBIC_D.to(t)
    return powers @ c, powers[:, :3] @ d


def _parzen_args(fixed, warped, mask, bins, fixed_range, moving_range, regions, fixed_rows):
    """Checks and the fused path's arguments ``(m, f, wt, fr, mr, ids, n_regions)``, or
    ``None`` where the pair needs the general path (a batch, or gradients on the fixed side)."""
    if bins < 8:
        raise MedregError(f"mutual information needs at least 8 bins, got {bins}")
    fused = (fixed.shape[0] == 1 and not fixed.requires_grad
             and (mask is None or not mask.requires_grad))
    if (regions is not None or fixed_rows is not None) and not fused:
        raise MedregError("regional (conditional) MI and precomputed fixed rows need one image "
                          "pair without gradients on the fixed image or mask")
    if not fused:
        return None
    if mask is not None and mask.shape[2:] != fixed.shape[2:]:
        raise MedregError(f"mask shape {tuple(mask.shape)} does not match image "
                          f"{tuple(fixed.shape)}")
    f = fixed[0, 0].reshape(-1)
    m = warped[0, 0].reshape(-1)
    wt = torch.ones_like(m) if mask is None else mask[0, 0].reshape(-1).to(m.dtype)
    fr = fixed_range or (float(f.min()), float(f.max()))
    mr = moving_range or (float(m.detach().min()), float(m.detach().max()))
    ids, n_regions = regions if regions is not None else (None, 1)
    return m, f, wt, fr, mr, ids, n_regions


def _parzen_loss(fixed, warped, mask, bins, fixed_range, moving_range, normalized,
                 fixed_window, regions=None, fixed_rows=None):
    args = _parzen_args(fixed, warped, mask, bins, fixed_range, moving_range, regions,
                        fixed_rows)
    if args is None:
        h_f, h_m, h_fm = _entropies(joint_histogram(fixed, warped, mask, bins, fixed_range,
                                                    moving_range, fixed_window))
        return (-((h_f + h_m) / h_fm) if normalized else -(h_f + h_m - h_fm)).mean()
    m, f, wt, fr, mr, ids, n_regions = args
    return _FusedParzen.apply(m, f, wt, bins, fr, mr, normalized, fixed_window, ids, n_regions,
                              fixed_rows)


def _parzen_value_and_grad(fixed, warped, mask, bins, fixed_range, moving_range, normalized,
                           fixed_window, regions=None, fixed_rows=None):
    """The fused loss and ``dL/dwarped`` (only channel 0 non-zero), no autograd graph; ``None``
    where the pair needs the general path."""
    args = _parzen_args(fixed, warped, mask, bins, fixed_range, moving_range, regions,
                        fixed_rows)
    if args is None:
        return None
    m, f, wt, fr, mr, ids, n_regions = args
    with torch.no_grad():
        loss, saved = _parzen_forward(m.detach(), f, wt, bins, fr, mr, normalized, fixed_window,
                                      ids, n_regions, fixed_rows)
        gm = _parzen_grad(saved)
    if warped.shape[1] == 1:
        return loss, gm.reshape(warped.shape)
    grad = torch.zeros_like(warped)
    grad[0, 0] = gm.reshape(warped.shape[2:])
    return loss, grad


def mi_value_and_grad(fixed: torch.Tensor, warped: torch.Tensor,
                      mask: torch.Tensor | None = None, bins: int = MI_BINS, fixed_range=None,
                      moving_range=None, fixed_window: str = FIXED_WINDOW,
                      regions: tuple[torch.Tensor, int] | None = None,
                      fixed_rows: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(mi(...), d mi / d warped)`` in closed form, without an autograd graph, for one image
    pair (``N = 1``) with no gradient on ``fixed`` or ``mask``; ``None`` otherwise (use
    autograd on :func:`mi`). Same arguments as :func:`mi`."""
    return _parzen_value_and_grad(fixed, warped, mask, bins, fixed_range, moving_range, False,
                                  fixed_window, regions, fixed_rows)


def nmi_value_and_grad(fixed: torch.Tensor, warped: torch.Tensor,
                       mask: torch.Tensor | None = None, bins: int = MI_BINS, fixed_range=None,
                       moving_range=None, fixed_window: str = FIXED_WINDOW,
                       regions: tuple[torch.Tensor, int] | None = None,
                       fixed_rows: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """As :func:`mi_value_and_grad`, for :func:`nmi`."""
    return _parzen_value_and_grad(fixed, warped, mask, bins, fixed_range, moving_range, True,
                                  fixed_window, regions, fixed_rows)


def mi(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None,
       bins: int = MI_BINS, fixed_range=None, moving_range=None,
       fixed_window: str = FIXED_WINDOW,
       regions: tuple[torch.Tensor, int] | None = None,
       fixed_rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``-MI`` (nats), Mattes' Parzen estimate (box window on fixed, cubic B-spline on moving).

    ``regions = (ids, R)``: ``ids`` ``(P,)`` int64 in ``[0, R)``, a spatial region per point
    (fused path only); the loss is then ``-I(F; M | region)``, conditional MI (Loeckx et al.
    2010), whose joint histograms are per region, so a spatially varying intensity relation
    (bias field) does not blur them. ``fixed_rows``: :func:`parzen_fixed_rows` of these fixed
    values (fused path only), to skip recomputing them.
    """
    return _parzen_loss(fixed, warped, mask, bins, fixed_range, moving_range, False,
                        fixed_window, regions, fixed_rows)


def nmi(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None,
        bins: int = MI_BINS, fixed_range=None, moving_range=None,
        fixed_window: str = FIXED_WINDOW,
        regions: tuple[torch.Tensor, int] | None = None,
        fixed_rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``-NMI`` with ``NMI = (H(F) + H(M)) / H(F, M)`` in [1, 2] (Studholme); with ``regions``
    (see :func:`mi`) the entropies are conditional on the region."""
    return _parzen_loss(fixed, warped, mask, bins, fixed_range, moving_range, True,
                        fixed_window, regions, fixed_rows)
