"""X-ray to CT registration (Esteban et al., MICCAI 2019): DRRs, landmarks, PnP, BOBYQA.

Modules: :mod:`geometry` (C-arm, poses, projection), :mod:`drr` (renderers), :mod:`landmarks`,
:mod:`network`, :mod:`prepare`, :mod:`pnp`, :mod:`refine`, :mod:`evaluate`, :mod:`variants`.
"""
