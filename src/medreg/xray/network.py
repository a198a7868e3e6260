"""Heatmap landmark network: detection with sub-pixel peaks and confidences, CPU training.

Convention:
    * Input ``(B, 1, H, W)`` X-ray/DRR in attenuation form, standardized per image inside the
      model (so raw DRR scales and X-ray scales both work).
    * Output ``(B, L, H/2, W/2)`` heatmaps; the target of landmark ``l`` is a Gaussian
      (``sigma`` heatmap pixels, peak 1) at its projection, all zeros when it is off the detector.
    * Heatmap pixel ``(i, j)`` covers detector pixels ``2i .. 2i+1``: detector ``u = 2 u_h + 0.5``
      (pixel-centre rule of :mod:`medreg.xray.geometry` applied at both resolutions).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from medreg.errors import MedregError

STRIDE = 2

#: Detections whose heatmap peak is below this are treated as "not visible".
MIN_CONFIDENCE = 0.15


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class LandmarkNet(nn.Module):
    """A small encoder-decoder with a dilated context stage (CPM-like large receptive field).

    Args:
        n_landmarks: number of heatmaps ``L``.
        width: channels of the first stage (stages use ``w, 2w, 4w``).
    """

    def __init__(self, n_landmarks: int = 23, width: int = 16) -> None:
        super().__init__()
        w = width
        self.n_landmarks, self.width = n_landmarks, width
        self.stem = _block(1, w)
        self.down1 = nn.Sequential(_block(w, 2 * w, 2), _block(2 * w, 2 * w))
        self.down2 = nn.Sequential(_block(2 * w, 4 * w, 2), _block(4 * w, 4 * w))
        self.context = nn.Sequential(_block(4 * w, 4 * w, dilation=2),
                                     _block(4 * w, 4 * w, dilation=4),
                                     _block(4 * w, 4 * w, dilation=8))
        self.fuse = _block(6 * w, 2 * w)
        self.head = nn.Conv2d(2 * w, n_landmarks, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` -> ``(B, L, ceil(H/2), ceil(W/2))`` heatmaps."""
        mean = x.mean(dim=(-2, -1), keepdim=True)
        std = x.std(dim=(-2, -1), keepdim=True).clamp(min=1e-6)
        h1 = self.down1(self.stem((x - mean) / std))
        h2 = self.context(self.down2(h1))
        up = F.interpolate(h2, size=h1.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.fuse(torch.cat([h1, up], dim=1)))


@dataclass
class Detections:
    """Per image and landmark: ``uv`` ``(B, L, 2)`` detector pixels, ``confidence`` ``(B, L)``."""

    uv: np.ndarray
    confidence: np.ndarray


def heatmap_targets(uv: torch.Tensor, shape: tuple[int, int], sigma: float) -> torch.Tensor:
    """``(B, L, 2)`` detector pixels -> ``(B, L, h, w)`` Gaussian targets (NaN uv -> zeros)."""
    h, w = shape
    uh = (uv - 0.5) / STRIDE  # detector -> heatmap pixel coordinates
    ys = torch.arange(h, dtype=uv.dtype)[:, None]
    xs = torch.arange(w, dtype=uv.dtype)[None, :]
    d2 = (xs - uh[..., 0, None, None]) ** 2 + (ys - uh[..., 1, None, None]) ** 2
    t = torch.exp(-d2 / (2 * sigma**2))
    return torch.nan_to_num(t, nan=0.0)


def peaks(heatmaps: torch.Tensor) -> Detections:
    """Sub-pixel peaks: arg-max, then a parabola through the log of the 3 values on each axis
    (exact for a Gaussian peak), the offset limited to half a pixel.

    Args:
        heatmaps: ``(B, L, h, w)``.

    Returns:
        :class:`Detections` in detector pixels (confidence = the heatmap's maximum).
    """
    b, l, h, w = heatmaps.shape
    hm = heatmaps.detach().float()
    conf, idx = hm.reshape(b, l, -1).max(-1)
    iy, ix = idx // w, idx % w
    pad = F.pad(hm, (1, 1, 1, 1), mode="replicate").clamp(min=1e-6).log()
    bi = torch.arange(b)[:, None].expand(b, l)
    li = torch.arange(l)[None, :].expand(b, l)

    def at(dy: int, dx: int) -> torch.Tensor:
        return pad[bi, li, iy + 1 + dy, ix + 1 + dx]

    def offset(m1: torch.Tensor, c: torch.Tensor, p1: torch.Tensor) -> torch.Tensor:
        den = m1 - 2 * c + p1
        off = torch.where(den < -1e-9, 0.5 * (m1 - p1) / den.clamp(max=-1e-9), 0.0)
        return off.clamp(-0.5, 0.5)

    c = at(0, 0)
    sx = ix.float() + offset(at(0, -1), c, at(0, 1))
    sy = iy.float() + offset(at(-1, 0), c, at(1, 0))
    uv = torch.stack([sx, sy], -1) * STRIDE + 0.5
    return Detections(uv.numpy().astype(np.float64), conf.numpy().astype(np.float64))


def detect(model: LandmarkNet, images: torch.Tensor, batch: int = 16) -> Detections:
    """Run the network without gradients -> :class:`Detections` for ``(B, 1, H, W)`` images."""
    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            outs.append(model(images[i:i + batch].float()))
    return peaks(torch.cat(outs))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random contrast (gamma on normalized image), offset and noise, per image."""
    b = x.shape[0]
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    n = (x - lo) / (hi - lo).clamp(min=1e-6)
    gamma = torch.exp(torch.randn(b, 1, 1, 1, generator=gen) * 0.25)
    n = n.clamp(min=0) ** gamma
    noise = torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.03
    return n + noise


@dataclass
class TrainConfig:
    """Training options (defaults: a few CPU minutes)."""

    epochs: int = 12
    batch: int = 16
    lr: float = 2e-3
    sigma: float = 1.5
    val_fraction: float = 0.1
    loss_weight: float = 100.0
    seed: int = 0
    time_limit_s: float | None = None


@dataclass
class TrainHistory:
    """Per-epoch training loss, validation loss and validation median pixel error."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_median_px: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stop: str = ""


def train(model: LandmarkNet, images: torch.Tensor, uv: torch.Tensor, config: TrainConfig, *,
          checkpoint: str | Path | None = None, meta: dict | None = None,
          progress: bool = True) -> TrainHistory:
    """Train (or fine-tune) on DRRs with known landmark projections.

    Args:
        images: ``(N, 1, H, W)`` DRRs.
        uv: ``(N, L, 2)`` projections (detector pixels); NaN where off the detector.
        checkpoint: write the best-validation weights here after each improving epoch.
        meta: stored beside the weights (names, geometry, ...).

    Returns:
        :class:`TrainHistory`; ``model`` holds the best-validation weights at the end.
    """
    n = len(images)
    if n < 2 or uv.shape[:2] != (n, model.n_landmarks):
        raise MedregError(f"need >= 2 images with {model.n_landmarks} landmarks each, got "
                          f"{n} images and uv {tuple(uv.shape)}")
    gen = torch.Generator().manual_seed(config.seed)
    perm = torch.randperm(n, generator=gen)
    n_val = max(1, int(round(config.val_fraction * n)))
    val, tr = perm[:n_val], perm[n_val:]
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps = config.epochs * math.ceil(len(tr) / config.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=max(steps, 1))
    hist, best, t0 = TrainHistory(), math.inf, time.perf_counter()
    bar = tqdm(total=steps, desc="train landmarks", disable=not progress)
    for _epoch in range(config.epochs):
        model.train()
        order = tr[torch.randperm(len(tr), generator=gen)]
        losses = []
        for i in range(0, len(order), config.batch):
            sel = order[i:i + config.batch]
            out = model(_augment(images[sel], gen))
            target = heatmap_targets(uv[sel], out.shape[-2:], config.sigma)
            loss = config.loss_weight * F.mse_loss(out, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        vloss, vmed = _validate(model, images[val], uv[val], config)
        hist.train_loss.append(float(np.mean(losses)))
        hist.val_loss.append(vloss)
        hist.val_median_px.append(vmed)
        if vloss < best:
            best = vloss
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
            if checkpoint is not None:
                save_model(checkpoint, model, meta or {})
        if config.time_limit_s and time.perf_counter() - t0 > config.time_limit_s:
            hist.stop = f"time limit after {_epoch + 1} epochs"
            break
    bar.close()
    model.load_state_dict(best_state)
    hist.seconds = time.perf_counter() - t0
    hist.stop = hist.stop or f"{config.epochs} epochs"
    return hist


def _validate(model, images, uv, config) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = model(images)
        loss = config.loss_weight * float(F.mse_loss(out, heatmap_targets(uv, out.shape[-2:],
                                                                           config.sigma)))
    det = peaks(out)
    err = np.linalg.norm(det.uv - uv.numpy(), axis=-1)
    return loss, float(np.nanmedian(err)) if np.isfinite(err).any() else float("nan")


def save_model(path: str | Path, model: LandmarkNet, meta: dict) -> Path:
    """Weights (float16 to stay small) + architecture + ``meta`` in one ``torch.save`` file."""
    p = Path(path)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    tmp = p.with_suffix(p.suffix + ".tmp")
    torch.save({"state": state, "n_landmarks": model.n_landmarks, "width": model.width,
                "meta": meta}, tmp)
    tmp.replace(p)
    return p


def load_model(path: str | Path) -> tuple[LandmarkNet, dict]:
    """Inverse of :func:`save_model` -> (model in eval mode, meta)."""
    p = Path(path)
    if not p.exists():
        raise MedregError(f"model file not found: {p}")
    blob = torch.load(p, map_location="cpu", weights_only=False)
    model = LandmarkNet(blob["n_landmarks"], blob["width"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in blob["state"].items()})
    return model.eval(), blob["meta"]
