"""Similarity losses for deformable and multimodal registration (lower is better).

Convention:
    * Images are ``(N, C, *S)`` tensors on the same grid; ``mask`` is ``(N, 1, *S)`` (weights in
      [0, 1]) or ``None``. Window sizes are in voxels of that grid.
    * Every function returns a scalar loss to minimize.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from medreg.core.axes import tensor_axis
from medreg.deformable.filters import box_mean
from medreg.errors import MedregError


def _wmean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype).expand_as(x)
    return (x * m).sum() / m.sum().clamp_min(1e-12)


def _inside_factors(shape: tuple[int, ...], window: int, dtype: torch.dtype,
                    device: torch.device) -> list[torch.Tensor]:
    """Per-axis fractions of each centred box inside the image, as broadcastable
    ``(1, 1, 1.., n, ..1)`` vectors; their product is the in-bounds fraction of the box."""
    r = window // 2
    out = []
    for axis, n in enumerate(shape):
        i = torch.arange(n, device=device)
        count = (torch.clamp(i + r, max=n - 1) - torch.clamp(i - r, min=0) + 1).to(dtype) / window
        view = [1, 1] + [1] * len(shape)
        view[2 + axis] = n
        out.append(count.reshape(view))
    return out


def _inside_fraction(shape: tuple[int, ...], window: int, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """``(1, 1, *S)`` fraction of each centred box inside the image (separable outer product)."""
    out = torch.ones((1, 1) + (1,) * len(shape), dtype=dtype, device=device)
    for f in _inside_factors(shape, window, dtype, device):
        out = out * f
    return out


def _lncc_terms(fixed: torch.Tensor, warped: torch.Tensor, window: int, eps: float,
                inside: bool = False) -> tuple[torch.Tensor, ...]:
    """Local means, covariance and variances over ``window``^dim boxes (one batched filter).

    ``inside``: average over the in-bounds voxels of each box (ANTs) instead of zero padding.
    """
    c = fixed.shape[1]
    stats = box_mean(torch.cat([fixed, warped, fixed * fixed, warped * warped, fixed * warped],
                               dim=1), window)
    if inside:
        stats = stats / _inside_fraction(fixed.shape[2:], window, fixed.dtype, fixed.device)
    mf, mw, ff, ww, fw = stats.split(c, dim=1)
    cov = fw - mf * mw
    vf = (ff - mf * mf).clamp_min(0)
    vw = (ww - mw * mw).clamp_min(0)
    return mf, mw, cov, vf, vw, vf * vw + eps


class _LNCC(torch.autograd.Function):
    """``-mean_w(cc^2)`` with the closed-form gradient for both images (box-filter adjoint).

    With ``A = cov``, ``B = var_f``, ``C = var_m``, ``cc^2 = A^2 / (B C + eps)`` per window and
    ``box`` the (self-adjoint) zero-padded box mean, the gradient w.r.t. the moving image is
    ``-(m(x) [f box(a) - box(a mf) - w box(b) + box(b mw)]) / sum(m)`` with ``a = 2 A / (BC+eps)``,
    ``b = 2 A^2 B / (BC+eps)^2`` weighted by the mask, and symmetrically for the fixed image.
    This is what autograd through :func:`lncc_reference` gives, at about half the cost.
    """

    @staticmethod
    def forward(ctx, fixed, warped, weights, window: int, eps: float):  # noqa: D102
        mf, mw, cov, vf, vw, den = _lncc_terms(fixed, warped, window, eps)
        cc2 = cov * cov / den
        total = weights.sum().clamp_min(1e-12) if weights is not None else None
        loss = -(cc2 * weights).sum() / total if weights is not None else -cc2.mean()
        ctx.save_for_backward(fixed, warped, weights, mf, mw, cov, vf, vw, den)
        ctx.window = window
        return loss

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        fixed, warped, weights, mf, mw, cov, vf, vw, den = ctx.saved_tensors
        a = 2 * cov / den
        q = a * cov / den  # 2 A^2 / (BC+eps)^2
        scale = -grad / (weights.sum().clamp_min(1e-12) if weights is not None else cov.numel())
        if weights is not None:
            a, q = a * weights, q * weights
        b_m, b_f = q * vf, q * vw
        c = fixed.shape[1]
        box = box_mean(torch.cat([a, a * mf, a * mw, b_m, b_m * mw, b_f, b_f * mf], dim=1),
                       ctx.window)
        ba, bamf, bamw, bbm, bbmw, bbf, bbfmf = box.split(c, dim=1)
        g_w = (fixed * ba - bamf - warped * bbm + bbmw) * scale
        g_f = (warped * ba - bamw - fixed * bbf + bbfmf) * scale
        return g_f, g_w, None, None, None


def lncc(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None,
         window: int = 5, eps: float = 1e-5) -> torch.Tensor:
    """Negative local squared NCC over ``window``^dim boxes (separable box filters, ANTs' CC).

    Returns ``-mean(cc^2)`` with ``cc^2 = cov^2 / (var_f var_m + eps)``, in ``[-1, 0]``; the mean
    is weighted by ``mask`` when given. Gradients (both images) are the closed form of
    :class:`_LNCC`, checked against autograd through :func:`lncc_reference` in float64.
    """
    weights = None if mask is None else mask.to(fixed.dtype).expand_as(fixed).contiguous()
    return _LNCC.apply(fixed, warped, weights, int(window), float(eps))


#: ``lncc_force`` works through the first spatial axis in slabs of about this many voxels (with
#: a halo of ``window // 2`` slices each side), so its statistics take a few slab-sized
#: buffers instead of about seven image-sized ones; results are identical.
LNCC_SLAB_VOXELS = 2**18


def lncc_force(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None,
               window: int = 5, eps: float = 1e-5, slab_voxels: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of :func:`lncc` and the pointwise CC forces of greedy SyN (ANTs, DIPY).

    With local means ``mf``, ``mw``, covariance ``A`` and variances ``B`` (fixed), ``C``
    (warped) of the window centred at each voxel, and ``f' = f - mf``, ``w' = w - mw``:
    ``force_w = -2A/(BC+eps) (f' - AB/(BC+eps) w')`` and ``force_f = -2A/(BC+eps) (w' - AC/(BC+eps)
    f')``, times the mask. This is the derivative of ``-cc^2`` at the centre voxel with the
    window statistics held fixed (ANTs' ``ANTSNeighborhoodCorrelation`` and DIPY's
    ``CCMetric`` use it): unlike the exact gradient of :func:`lncc` it has no component that
    rewards growing the foreground, the drift a symmetric scheme is otherwise free to follow.
    Boxes are averaged over their in-bounds voxels (as ANTs does), so the image border does not
    produce spurious forces; the loss is computed from the same statistics.

    Large volumes are processed in slabs along the first spatial axis (``slab_voxels``, default
    :data:`LNCC_SLAB_VOXELS`; each slab carries ``window // 2`` neighbouring slices each side,
    so every box sees the same voxels as in one pass).

    Returns:
        ``(loss, force_f, force_w)``: scalar, and two ``(N, C, *S)`` tensors (no graph).
    """
    with torch.no_grad():  # in-place arithmetic: this runs once per greedy iteration
        inv = [f.reciprocal() for f in
               _inside_factors(fixed.shape[2:], window, fixed.dtype, fixed.device)]
        depth, r = fixed.shape[2], window // 2
        per_slice = max(1, fixed[:, :, :1].numel())
        thick = max(2 * r + 1, (slab_voxels or LNCC_SLAB_VOXELS) // per_slice)
        if thick >= depth:
            return _lncc_force_block(fixed, warped, mask, window, eps, inv, 0, depth, 0, depth)
        force_f, force_w = torch.empty_like(fixed), torch.empty_like(warped)
        num = torch.zeros((), dtype=torch.float64, device=fixed.device)
        den = torch.zeros((), dtype=torch.float64, device=fixed.device)
        for z0 in range(0, depth, thick):
            z1 = min(depth, z0 + thick)
            a, b = max(0, z0 - r), min(depth, z1 + r)
            part = _lncc_force_block(fixed, warped, mask, window, eps, inv, a, b, z0, z1,
                                     sums=True)
            n_cc, n_w, f_f, f_w = part
            num += n_cc
            den += n_w
            force_f[:, :, z0:z1].copy_(f_f)
            force_w[:, :, z0:z1].copy_(f_w)
        loss = (-num / den.clamp_min(1e-12)).to(fixed.dtype)
        return loss, force_f, force_w


def _lncc_force_block(fixed, warped, mask, window, eps, inv, a, b, z0, z1, sums=False):
    """:func:`lncc_force` on slices ``[a, b)`` of the first spatial axis, kept on ``[z0, z1)``.

    ``inv`` are the whole image's per-axis inside factors (reciprocals). Returns ``(loss,
    force_f, force_w)``, or with ``sums`` the weighted CC sum and weight sum of the kept
    slices (float64) instead of the loss.
    """
    f, w = fixed[:, :, a:b], warped[:, :, a:b]
    m = None if mask is None else mask[:, :, a:b].to(fixed.dtype)
    factors = [inv[0][:, :, a:b]] + inv[1:]

    def inside_mean(x: torch.Tensor) -> torch.Tensor:  # separable: no image-sized factor
        out = box_mean(x, window)
        for fac in factors:
            out.mul_(fac)
        return out

    # one statistic at a time, and each buffer reused once its value is spent, keeps the
    # peak at about seven block-sized tensors
    mf, mw, vf, vw, cov = (inside_mean(x) for x in (f, w, f * f, w * w, f * w))
    vf.addcmul_(mf, mf, value=-1).clamp_(min=0)
    vw.addcmul_(mw, mw, value=-1).clamp_(min=0)
    cov.addcmul_(mf, mw, value=-1)
    t = torch.mul(vf, vw).add_(eps)
    torch.div(cov, t, out=t)  # A / (BC + eps)
    cc = cov.mul_(t)
    keep = slice(z0 - a, z1 - a)
    if sums:
        cck = cc[:, :, keep]
        if m is None:
            n_cc, n_w = cck.sum(dtype=torch.float64), float(cck.numel())
        else:
            mk = m[:, :, keep].expand_as(cck)
            n_cc, n_w = (cck * mk).sum(dtype=torch.float64), mk.sum(dtype=torch.float64)
        head = (n_cc, torch.as_tensor(n_w, dtype=torch.float64))
    else:
        head = (-_wmean(cc, mask),)
    del cov, cc
    fc, wc = mf.neg_().add_(f), mw.neg_().add_(w)  # f', w' in the means' buffers
    force_w = vf.mul_(t).mul_(wc).sub_(fc).mul_(t).mul_(2)  # -2t (f' - t B w')
    force_f = vw.mul_(t).mul_(fc).sub_(wc).mul_(t).mul_(2)
    if m is not None:
        force_w.mul_(m)
        force_f.mul_(m)
    if sums:
        return (*head, force_f[:, :, keep], force_w[:, :, keep])
    return (*head, force_f, force_w)


def lncc_reference(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None,
                   window: int = 5, eps: float = 1e-5) -> torch.Tensor:
    """:func:`lncc` written with plain differentiable tensor operations (the test reference)."""
    mf, mw = box_mean(fixed, window), box_mean(warped, window)
    cov = box_mean(fixed * warped, window) - mf * mw
    vf = (box_mean(fixed * fixed, window) - mf * mf).clamp_min(0)
    vw = (box_mean(warped * warped, window) - mw * mw).clamp_min(0)
    return -_wmean(cov * cov / (vf * vw + eps), mask)


def mse(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None
        ) -> torch.Tensor:
    """Mean squared difference."""
    return _wmean((fixed - warped) ** 2, mask)


def _spatial_gradient(x: torch.Tensor, spacing: tuple[float, ...] | None) -> torch.Tensor:
    """``(N, C, dim, *S)`` central differences along coordinate axes (x, y[, z])."""
    nsp = x.ndim - 2
    sp = spacing or (1.0,) * nsp
    return torch.stack([torch.gradient(x, spacing=float(sp[a]), dim=2 + tensor_axis(a, nsp))[0]
                        for a in range(nsp)], dim=2)


def ngf(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None,
        eta: float = 0.1, spacing: tuple[float, ...] | None = None) -> torch.Tensor:
    """Normalized gradient fields: ``mean(1 - <g_f, g_m>^2 / (|g_f|_e^2 |g_m|_e^2))``.

    ``e`` per image is ``eta`` times its mean gradient magnitude (Haber & Modersitzki).
    """
    gf, gm = _spatial_gradient(fixed, spacing), _spatial_gradient(warped, spacing)
    ef = eta * gf.norm(dim=2).mean()
    em = eta * gm.norm(dim=2).mean()
    dot = (gf * gm).sum(2)
    nf = gf.pow(2).sum(2) + ef**2
    nm = gm.pow(2).sum(2) + em**2
    return _wmean(1 - dot * dot / (nf * nm), mask)


def _shift(x: torch.Tensor, offset: tuple[int, ...]) -> torch.Tensor:
    """``x(p + offset)`` with replicated borders; ``offset`` in voxels ordered (x, y[, z])."""
    nsp = x.ndim - 2
    r = max(abs(o) for o in offset)
    xp = F.pad(x, [r] * (2 * nsp), mode="replicate")
    sl = [slice(None), slice(None)] + [slice(None)] * nsp
    for a, o in enumerate(offset):
        ax = tensor_axis(a, nsp)
        sl[2 + ax] = slice(r + o, r + o + x.shape[2 + ax])
    return xp[tuple(sl)]


def mind_ssc_descriptors(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptors (Heinrich et al. 2013): ``(N, C, *S)`` -> ``(N, C*K, *S)``.

    ``K`` = 12 (3D) or 4 (2D) self-similarity pairs between the 6- (4-) neighbourhood at
    distance ``dilation``, patch distances averaged over ``(2 radius + 1)`` boxes,
    ``exp(-D / V)`` with ``V`` the mean patch distance, scaled so the largest entry is 1.
    """
    nsp = image.ndim - 2
    units = [tuple(s * (i == a) for i in range(nsp)) for a in range(nsp) for s in (-1, 1)]
    pairs = [(p, q) for p, q in itertools.combinations(units, 2)
             if sum((a - b) ** 2 for a, b in zip(p, q, strict=True)) == 2]
    dists = []
    for p, q in pairs:
        sp = _shift(image, tuple(dilation * v for v in p))
        sq = _shift(image, tuple(dilation * v for v in q))
        dists.append(box_mean((sp - sq) ** 2, 2 * radius + 1))
    d = torch.cat(dists, dim=1)
    d = d - d.amin(1, keepdim=True)
    var = d.mean(1, keepdim=True)
    var = var.clamp(min=var.mean() * 1e-3 + 1e-12, max=var.mean() * 1e3 + 1e-12)
    desc = torch.exp(-d / var)
    return desc / desc.amax(1, keepdim=True)


def mind_ssc(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None,
             radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """Mean squared difference of MIND-SSC descriptors (modality independent), in [0, 1]."""
    diff = (mind_ssc_descriptors(fixed, radius, dilation)
            - mind_ssc_descriptors(warped, radius, dilation)) ** 2
    return _wmean(diff.mean(1, keepdim=True), mask)


mind_loss = mind_ssc


#: Deformable similarity losses by name: ``loss(fixed, warped, mask)``.
DEFORMABLE_METRICS: dict[str, Callable[..., torch.Tensor]] = {
    "lncc": lncc, "cc": lncc, "mse": mse, "ngf": ngf, "mind": mind_loss, "mind-ssc": mind_loss,
}

#: Metrics usable across modalities (the rest assume the same contrast).
MULTIMODAL = ("ngf", "mind", "mind-ssc", "mi", "nmi")


def get_deformable_metric(name: str, **options) -> Callable[..., torch.Tensor]:
    """``loss(fixed, warped, mask=None)`` for ``name``; MI/NMI come from :mod:`medreg.metrics`."""
    key = name.lower()
    if key in DEFORMABLE_METRICS:
        fn = DEFORMABLE_METRICS[key]
        return lambda f, w, mask=None: fn(f, w, mask, **options)
    try:
        from medreg.metrics import get_metric
    except ImportError:
        get_metric = None
    if get_metric is not None:
        try:
            module = get_metric(key, **options)
        except (KeyError, ValueError):
            module = None
        if module is not None:
            return lambda f, w, mask=None: module(f, w, mask=mask)
    raise MedregError(f"unknown deformable metric {name!r}; choose from "
                      f"{', '.join(sorted(DEFORMABLE_METRICS))}, mi, nmi")
