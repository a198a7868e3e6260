"""Feature-based, Fourier and landmark registration (keypoints, phase correlation, point sets).

Submodules are imported on use: ``keypoints`` (OpenCV detect/match/fit), ``phase`` (phase
correlation), ``landmarks`` (closed-form fits, thin-plate splines, ICP), ``preprocess``
(intensity preparation) and ``methods`` (the plug-in entry points).
"""
