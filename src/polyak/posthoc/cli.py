"""``polyak posthoc DIR --sigma-rel 0.07 -o model.safetensors``: synthesise an EMA from a snapshot directory."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_commands"]


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "posthoc",
        help="synthesise the EMA of any width from a PostHocEMA snapshot directory",
        description=(
            "Combine the snapshots of a polyak.PostHocEMA run into the power-function EMA of width SIGMA_REL "
            "(Karras et al. 2024, EDM2), print the least-squares coefficients' quality, and write the averaged "
            "tensors (a plain safetensors file for model.load_state_dict(..., strict=False)) and optionally a plot of the profiles."
        ),
    )
    p.add_argument("directory", help="the PostHocEMA directory (holds manifest.safetensors)")
    p.add_argument("--sigma-rel", type=float, required=True, help="relative width of the EMA to synthesise")
    p.add_argument("--at", type=int, default=None, help="snapshot step to synthesise at (default: the last)")
    p.add_argument("-o", "--output", default=None, help="write the averaged tensors here")
    p.add_argument("--plot", default=None, help="write a PNG of the stored, exact and synthesised profiles")
    p.add_argument("--quiet", action="store_true", help="no progress line while the snapshots are read")
    p.set_defaults(func=_posthoc)


def _posthoc(args: argparse.Namespace) -> int:
    from polyak.io._atomic import check_writable_destination
    from polyak.posthoc._snapshots import Snapshots

    if args.output is not None and not str(args.output).endswith(".safetensors"):
        raise ValueError(f"-o {args.output!r}: the output is a safetensors file; name it *.safetensors")
    for dest in (args.output, args.plot):
        if dest is not None:
            check_writable_destination(dest)  # before any work
    snaps = Snapshots(args.directory)
    weights = snaps.weights(args.sigma_rel, args.at)
    used = sorted(set(weights.steps))
    print(
        f"{args.directory}: {len(snaps.steps)} snapshot(s), sigma_rel "
        f"{', '.join(f'{s:.3g}' for s in snaps.sigma_rels)}, update_every {snaps.manifest.update_every}"
    )
    print(
        f"sigma_rel {weights.sigma_rel:g} (gamma {weights.gamma:.4f}) at step {weights.at}: "
        f"{len(used)} snapshot(s) combined, relative profile error {weights.error:.2e}, gain {weights.gain:.3g}"
    )
    if weights.error > 0.05:
        print("note: over 5% profile error: this width is hard to reach from the stored ones (store a closer one)")
    if args.output is not None:
        from polyak.io._exchange import save_plain

        state = snaps.combine(weights, progress=not args.quiet)
        save_plain(args.output, state)
        print(f"wrote {len(state)} tensors to {args.output}")
    if args.plot is not None:
        from polyak.posthoc.plot import plot_profiles

        plot_profiles(weights, snaps.manifest.update_every, args.plot)
        print(f"wrote {args.plot}")
    return 0
