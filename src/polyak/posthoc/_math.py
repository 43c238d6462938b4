"""Post-hoc EMA math (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, section 3 and appendix C): pure functions, float64, no model and no files.

A power-function EMA with exponent ``gamma`` uses ``beta_j = (1 - 1/j) ** (gamma + 1)`` at its j-th
averaging update (``polyak.schedules.power_function``). After ``n`` updates it holds
``sum_j w_j theta_j`` with the exact discrete profile (the product of the betas telescopes)::

    w_j(n, gamma) = (j / n) ** (gamma + 1) - ((j - 1) / n) ** (gamma + 1),   1 <= j <= n,

which sums to 1. With ``update_every = k`` the EMA's decay over k steps is the product of the k betas,
so the profile is the same function of the update count ``n = t / k``. The paper's least squares works
on the continuous profiles ``t ** gamma``; here the stored and the target profiles are the exact
discrete vectors above, so the reported error is the true distance between what was synthesised and
the EMA that was asked for, and ``|synthesised - exact| <= error * ||w_target|| * ||theta||`` holds
per coordinate (Cauchy-Schwarz).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from polyak._validate import as_float, as_int

__all__ = [
    "GAMMA_AT_MAX_WIDTH",
    "SIGMA_REL_MAX",
    "Solution",
    "gamma_to_sigma_rel",
    "profile",
    "sigma_rel_to_gamma",
    "solve",
]

# d/dgamma log sigma_rel^2 = 1/(g+1) - 2/(g+2) - 1/(g+3) = 0  <=>  g^2 + 3g + 1 = 0
GAMMA_AT_MAX_WIDTH = (math.sqrt(5.0) - 3.0) / 2.0
_CHUNK = 1 << 16  # profile entries per row held at once


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power-function profile ``t ** gamma`` on ``[0, t]``:
    ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))`` (EDM2, eq. 3 and appendix C.1).
    """
    g = as_float(gamma, "gamma")
    if g <= -1.0:
        raise ValueError(f"gamma must be > -1 (the profile t**gamma must be integrable), got {g}")
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


SIGMA_REL_MAX = gamma_to_sigma_rel(GAMMA_AT_MAX_WIDTH)  # 0.3003...: no power function is wider


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``gamma`` of the power-function EMA of relative width ``sigma_rel``: the largest real
    root of ``gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0`` with ``s = sigma_rel ** -2`` (EDM2,
    algorithm 2), found by bisection to the last bit. ``sigma_rel_to_gamma(0.05) = 16.9722``,
    ``sigma_rel_to_gamma(0.10) = 6.9372``.
    """
    sigma = as_float(sigma_rel, "sigma_rel")
    if not (0.0 < sigma < SIGMA_REL_MAX):
        raise ValueError(
            f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}), got {sigma}; the widest power-function EMA has "
            f"sigma_rel {SIGMA_REL_MAX:.4f} (typical values are 0.05 to 0.15)"
        )
    s = sigma**-2

    def f(g: float) -> float:  # (g+2)^2 (g+3) - s (g+1): < 0 between the two positive-width roots
        return (g + 2.0) ** 2 * (g + 3.0) - s * (g + 1.0)

    lo, hi = GAMMA_AT_MAX_WIDTH, 1.0 / sigma + 1.0
    while f(hi) <= 0.0:
        hi *= 2.0
    while True:
        mid = 0.5 * (lo + hi)
        if not (lo < mid < hi):
            break
        if f(mid) <= 0.0:
            lo = mid
        else:
            hi = mid
    # the root lies in [lo, hi], two adjacent floats: pick the one whose width is closer to sigma_rel
    return min((lo, hi), key=lambda g: abs(gamma_to_sigma_rel(g) - sigma))


def _rows(stored: Sequence[tuple[int, float]], start: int, stop: int) -> Tensor:
    """``w_j(n_i, gamma_i)`` for each stored ``(n_i, gamma_i)`` and ``j`` in ``[start, stop)`` (1-based),
    zero for ``j > n_i``, in float64, shape ``(len(stored), stop - start)``.

    Computed as ``(j/n)^g * (1 - (1 - 1/j)^g)`` with ``g = gamma + 1`` through ``exp``/``expm1``/
    ``log1p``, so neither a large exponent (overflow) nor a large j (cancellation) loses digits; the
    second factor is computed once per distinct gamma."""
    j = torch.arange(start, stop, dtype=torch.float64)
    log_j, log1p_j = torch.log(j), torch.log1p(-1.0 / j)
    tails = {g: -torch.expm1((g + 1.0) * log1p_j) for g in {g for _, g in stored}}
    gs = torch.tensor([g + 1.0 for _, g in stored], dtype=torch.float64).unsqueeze(1)
    log_n = torch.tensor([math.log(n) for n, _ in stored], dtype=torch.float64).unsqueeze(1)
    ns = torch.tensor([n for n, _ in stored], dtype=torch.float64).unsqueeze(1)
    head = torch.exp(gs * (log_j - log_n))
    tail = torch.stack([tails[g] for _, g in stored])
    return torch.where(j <= ns, head * tail, 0.0)


def profile(n: int, gamma: float) -> Tensor:
    """The exact weights ``w_1 .. w_n`` (float64, summing to 1) that a power-function EMA of exponent
    ``gamma`` gives its n averaging updates: ``w_j = (j/n)^(gamma+1) - ((j-1)/n)^(gamma+1)``."""
    n = as_int(n, "n", minimum=1)
    g = as_float(gamma, "gamma", minimum=-1.0)
    if g <= -1.0:
        raise ValueError(f"gamma must be > -1, got {g}")
    return _rows([(n, g)], 1, n + 1)[0]


@dataclass(frozen=True)
class Solution:
    """Least-squares coefficients (one per stored profile, summing to 1) and the relative L2 error
    ``||sum_i c_i w(n_i, gamma_i) - w(n, gamma)|| / ||w(n, gamma)||`` of the profile they give.
    ``gain = sum_i |c_i|`` bounds how much the stored tensors' rounding is amplified."""

    coefficients: tuple[float, ...]
    error: float
    gain: float
    target_norm: float


def _segments(items: Sequence[tuple[int, float]]) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Walk the update index once, in segments ``(e_{s-1}, e_s]`` between the distinct ``n`` of ``items``
    (split into chunks of at most ``_CHUNK``), yielding ``(scale, rows, block)``: ``rows[k]`` is
    ``w_j(e_s, gamma_k)`` over the segment for each distinct gamma, ``block[i]`` the gamma index of item i
    and ``scale[i] = (e_s / n_i)^(gamma_i + 1)`` (0 when item i ends before the segment), so that
    ``w_j(n_i, gamma_i) = scale[i] * rows[block[i]][j]``: a profile restricted to ``j <= e`` is the profile
    of length e, scaled. Every scale is <= 1 (nothing overflows), and each row is computed once per
    distinct gamma instead of once per item."""
    gammas = sorted({g for _, g in items})
    block = torch.tensor([gammas.index(g) for _, g in items])
    ns = torch.tensor([n for n, _ in items], dtype=torch.float64)
    gs = torch.tensor([g + 1.0 for _, g in items], dtype=torch.float64)
    prev = 0
    for end in sorted({n for n, _ in items}):
        scale = torch.where(ns >= end, torch.exp(gs * (math.log(end) - torch.log(ns))), 0.0)
        for start in range(prev + 1, end + 1, _CHUNK):
            stop = min(start + _CHUNK, end + 1)
            yield scale, _rows([(end, g) for g in gammas], start, stop), block
        prev = end


def _r_factor(items: Sequence[tuple[int, float]]) -> tuple[Tensor, Tensor]:
    """The triangular factor R (``P = Q R``) of the matrix P whose columns are the exact profiles of
    ``items``, split as ``(R[:, :-1], R[:, -1])``, in float64. Each segment's block of P is
    ``rows^T E`` (``E[k, i] = scale[i]`` where item i uses gamma k), so it contributes the K rows
    ``qr(rows^T).R @ E``; stacking them under the running R and re-factorising (a tall-skinny QR) never
    forms ``P^T P``, whose conditioning is the square of P's."""
    width = len(items)
    columns = torch.arange(width)
    r = torch.zeros(0, width, dtype=torch.float64)
    for scale, rows, block in _segments(items):
        spread = torch.zeros(rows.shape[0], width, dtype=torch.float64)
        spread[block, columns] = scale
        part = torch.linalg.qr(rows.T, mode="r").R @ spread
        r = torch.linalg.qr(torch.cat([r, part]), mode="r").R
    return r[:, :-1], r[:, -1]


def solve(stored: Sequence[tuple[int, float]], target: tuple[int, float]) -> Solution:
    """Coefficients ``c`` minimising ``||sum_i c_i w(n_i, gamma_i) - w(n, gamma)||_2`` subject to
    ``sum_i c_i = 1`` (so a constant model stays constant), over the exact discrete profiles.

    The paper (EDM2, algorithm 3) solves the unconstrained normal equations of the continuous profiles,
    which square the conditioning of nearly collinear neighbouring profiles. Here the triangular factor R
    of the exact discrete profiles ``[w_1 .. w_M | w]`` is accumulated segment by segment in float64
    (``_r_factor``: a QR of the stacked partial factors, never a Gram matrix), and the constraint is
    eliminated with an orthonormal basis Z of ``{c : sum c = 0}``: ``c = 1/M + Z y`` with y the SVD least-
    squares (``gelsd``) solution of ``R_A Z y = r_w - R_A 1/M``. A target equal to a stored profile returns that one
    (coefficient 1, error 0). The residual is summed directly, not from ``c^T G c - 2 c^T b + ||w||^2``,
    which would cancel. Cost: ``O(N K^2 + S M^3)`` for M stored profiles of K distinct gammas over N updates in
    S segments (distinct snapshot steps and chunks).

    Args:
        stored: ``(n_i, gamma_i)``: update count and exponent of each stored average.
        target: ``(n, gamma)`` of the average wanted; every ``n_i`` must be ``<= n``.
    """
    if not stored:
        raise ValueError("no stored averages to combine; take at least one snapshot first")
    pairs = [(as_int(n, "n", minimum=1), as_float(g, "gamma")) for n, g in stored]
    n_r, g_r = as_int(target[0], "n", minimum=1), as_float(target[1], "gamma")
    for _, g in [*pairs, (n_r, g_r)]:
        if g <= -1.0:
            raise ValueError(f"gamma must be > -1, got {g}")
    if max(n for n, _ in pairs) > n_r:
        raise ValueError(f"stored averages must not be later than the target: {max(n for n, _ in pairs)} > {n_r}")
    m = len(pairs)
    for i, (n, g) in enumerate(pairs):
        if n == n_r and math.isclose(g, g_r, rel_tol=1e-12, abs_tol=0.0):
            one_hot = tuple(1.0 if k == i else 0.0 for k in range(m))
            return Solution(one_hot, 0.0, 1.0, float(profile(n_r, g_r).norm()))
    items = [*pairs, (n_r, g_r)]
    r_a, r_w = _r_factor(items)
    centre = torch.full((m,), 1.0 / m, dtype=torch.float64)
    sol = centre
    if m > 1:  # c = centre + Z y with Z an orthonormal basis of {c : sum c = 0}
        basis = torch.linalg.qr(torch.ones(m, 1, dtype=torch.float64), mode="complete").Q[:, 1:]
        rhs = (r_w - r_a @ centre).unsqueeze(1)
        sol = centre + basis @ torch.linalg.lstsq(r_a @ basis, rhs, driver="gelsd").solution.squeeze(1)
    sol = sol / sol.sum()
    signed = torch.cat([sol, torch.tensor([-1.0], dtype=torch.float64)])
    resid2 = 0.0
    for scale, rows, block in _segments(items):
        per_gamma = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, block, signed * scale)
        diff = per_gamma @ rows
        resid2 += float(diff @ diff)
    norm2 = float(r_w @ r_w)
    return Solution(
        coefficients=tuple(float(c) for c in sol),
        error=math.sqrt(resid2 / norm2),
        gain=float(sol.abs().sum()),
        target_norm=math.sqrt(norm2),
    )
