"""Post-hoc EMA (Karras et al. 2024, EDM2): store power-function EMAs during training, choose the
averaging width afterwards.

``PostHocEMA`` trains and snapshots; ``Snapshots(directory)`` reads a run back; the pure math (sigma_rel
and gamma, exact profiles, the constrained least squares) is in ``polyak.posthoc._math``.
"""

from polyak.posthoc._ema import PostHocEMA
from polyak.posthoc._math import SIGMA_REL_MAX, gamma_to_sigma_rel, profile, sigma_rel_to_gamma, solve
from polyak.posthoc._snapshots import Snapshots, Synthesis

__all__ = [
    "SIGMA_REL_MAX",
    "PostHocEMA",
    "Snapshots",
    "Synthesis",
    "gamma_to_sigma_rel",
    "profile",
    "sigma_rel_to_gamma",
    "solve",
]
