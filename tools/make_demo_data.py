"""Build the bundled demo sample (src/medreg/data/) from the MNI152 2009a template.

Run from the repository root with ``../shared/data`` beside it:
``.venv/bin/python tools/make_demo_data.py``. The output is deterministic (seed 2009).

The fixed image is the template at 2 mm; the moving image is the same template moved by a
known affine at 1 mm, then taken to 2 mm, with noise and a smooth bias field, so nothing
about the moving image is an exact resampling of the fixed one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from medreg import Affine, Image, read_image, resample, write_image
from medreg.engine import smooth_image
from medreg.io.transforms import write_transform

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain" / "mni152_2009a"
OUT = Path(__file__).resolve().parents[1] / "src" / "medreg" / "data"


def known_affine(center: np.ndarray) -> Affine:
    """Rotation (8, -6, 10) deg, scales (1.05, 0.96, 1.02), translation (7, -9, 5) mm."""
    r = Rotation.from_euler("xyz", [8, -6, 10], degrees=True).as_matrix()
    return Affine(3, r @ np.diag([1.05, 0.96, 1.02]), [7.0, -9.0, 5.0], center=center)


def main() -> None:
    t1 = read_image(SHARED / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").float()
    gm = read_image(SHARED / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").float()
    wm = read_image(SHARED / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").float()
    grid = t1.grid.downsample(2)
    smooth = smooth_image(t1, 0.85)
    fixed = resample(smooth, grid)
    true = known_affine(grid.center())
    moving_1mm = resample(smooth, t1.grid, true.inverse())  # moving(T(x)) = fixed(x)
    moving = resample(moving_1mm, grid)
    rng = np.random.default_rng(2009)
    pts = grid.world_points(torch.float64)
    c = torch.as_tensor(grid.center())
    bias = 1.0 + 0.15 * torch.sin((pts - c)[..., 0] / 60.0) * torch.cos((pts - c)[..., 2] / 80.0)
    noisy = moving.tensor[0] * bias.float() + torch.as_tensor(
        rng.normal(0, 2.0, grid.shape), dtype=torch.float32)
    brain = resample(Image(((gm.tensor + wm.tensor) > 127).to(torch.uint8), t1.grid), grid,
                     interpolation="nearest")
    OUT.mkdir(parents=True, exist_ok=True)
    write_image(fixed.with_tensor(fixed.tensor.round().clamp(0, 255).to(torch.uint8)),
                OUT / "mni152_t1_2mm.nii.gz")
    write_image(moving.with_tensor(noisy.round().clamp(0, 255).to(torch.uint8)[None]),
                OUT / "mni152_t1_2mm_moved.nii.gz")
    write_image(brain, OUT / "mni152_brainmask_2mm.nii.gz")
    write_transform(true, OUT / "true_fixed_to_moving.tfm")
    (OUT / "demo.json").write_text(json.dumps({
        "fixed": "mni152_t1_2mm.nii.gz", "moving": "mni152_t1_2mm_moved.nii.gz",
        "mask": "mni152_brainmask_2mm.nii.gz", "true_transform": "true_fixed_to_moving.tfm",
        "noise_sd": 2.0, "bias_amplitude": 0.15}, indent=2))


if __name__ == "__main__":
    main()
