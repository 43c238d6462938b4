"""``polyak smooth``: smooth one column of a CSV or JSONL file (EMA, SMA, WMA or a Kalman filter)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from pathlib import Path
from typing import Any

METHODS = ("ema", "sma", "wma", "kalman")


def add_commands(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "smooth",
        help="smooth a column of a CSV/JSONL file",
        description=__doc__,
        epilog="example: polyak smooth train_log.csv --column loss --span 20 --plot loss.png --out smoothed.csv",
    )
    p.add_argument("file", help="a .csv or .jsonl file (one JSON object per line)")
    p.add_argument("--column", required=True, help="the column to smooth")
    p.add_argument("--method", choices=METHODS, default="ema", help="default: ema")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--span", type=float, help="EMA span (alpha = 2/(span+1)); also the default window")
    group.add_argument("--alpha", type=float, help="EMA smoothing factor in (0, 1]")
    group.add_argument("--halflife", type=float, help="EMA half-life in rows")
    group.add_argument("--com", type=float, help="EMA centre of mass")
    p.add_argument("--window", type=int, help="window for sma/wma, >= 1 (default: the span, else 20)")
    p.add_argument("--no-adjust", action="store_true", help="EMA as the plain recursion (pandas adjust=False)")
    p.add_argument("--process-var", type=float, help="kalman: level noise q (default: matches the EMA's alpha)")
    p.add_argument("--obs-var", type=float, help="kalman: observation noise r (default: variance of the column)")
    p.add_argument(
        "--out",
        help="write the rows with a '<column>_smoothed' column to this CSV (written atomically: it may be the "
        "input file itself)",
    )
    p.add_argument("--plot", help="save a PNG of raw vs smoothed (needs matplotlib)")
    p.set_defaults(func=run)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, expected a .csv or .jsonl file")
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows = []
        with path.open() as fh:
            for number, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{number}: not a JSON object per line ({exc.msg})") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                    rows.append(row)
        return rows
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = []
        for row in reader:
            if None in row:  # more fields than the header: the columns of this row are shifted
                raise ValueError(
                    f"{path}:{reader.line_num}: {len(reader.fieldnames or ()) + len(row[None])} fields, but the "
                    f"header has {len(reader.fieldnames or ())}; fix the row (quote fields that hold commas)"
                )
            rows.append(row)
        return rows


def write_rows(path: Path, rows: list[dict[str, Any]], column: str, values: Any) -> None:
    """Write ``rows`` plus ``column`` (replaced if present) as CSV, atomically: the whole text is built
    first, then ``polyak.io``'s atomic writer replaces the file, so ``path`` may be the input itself."""
    fieldnames: dict[str, None] = {}
    for row in rows:  # every key of every row, in order of appearance (JSONL rows may differ)
        fieldnames.update(dict.fromkeys(row))
    fieldnames[column] = None
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(fieldnames), restval="")
    writer.writeheader()
    for row, value in zip(rows, values):
        writer.writerow({**row, column: "" if math.isnan(value) else repr(float(value))})
    from polyak.io._atomic import atomic_writer, write_chunked

    with atomic_writer(path) as handle:
        write_chunked(handle, text.getvalue().encode("utf-8"))


def _to_float(value: Any) -> float:
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"not a number: {value!r}") from None


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from polyak.series import ema, kalman_local_level, sma, wma

    path = Path(args.file)
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path} has no rows")
    columns = list(rows[0].keys())
    if args.column not in columns:
        raise ValueError(f"column {args.column!r} not in {path}; available: {', '.join(map(str, columns))}")
    try:
        x = np.array([_to_float(r.get(args.column)) for r in rows], dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"column {args.column!r}: {exc}") from None
    params = {k: getattr(args, k) for k in ("span", "alpha", "halflife", "com") if getattr(args, k) is not None}
    if not params:
        params = {"span": 20.0}
    if args.method == "ema":
        smoothed = ema(x, adjust=not args.no_adjust, **params)
    elif args.method in ("sma", "wma"):
        if args.window is not None and args.window < 1:
            raise ValueError(f"--window must be >= 1, got {args.window}")
        window = args.window if args.window is not None else (round(args.span) if args.span else 20)
        smoothed = sma(x, window, min_periods=1) if args.method == "sma" else wma(x, window)
    else:
        from polyak.series._params import resolve_alpha

        a = resolve_alpha(
            alpha=params.get("alpha"), span=params.get("span"), halflife=params.get("halflife"), com=params.get("com")
        )
        finite = x[np.isfinite(x)]  # NaN and +-inf are missing values
        r = args.obs_var if args.obs_var is not None else (float(np.var(finite)) if finite.size else 0.0) or 1.0
        q = args.process_var if args.process_var is not None else (r * a * a / (1.0 - a) if a < 1.0 else r * 1e6)
        smoothed = kalman_local_level(x, process_var=q, obs_var=r).mean
    name = f"{args.column}_smoothed"
    if args.out:
        out = Path(args.out)
        write_rows(out, rows, name, smoothed)
        print(f"wrote {len(rows)} rows to {out}")
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'polyak[experiments]'") from None
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot(x, alpha=0.4, label=args.column)
        ax.plot(smoothed, label=f"{args.method} {params}")
        ax.set_xlabel("row")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        plt.close(fig)
        print(f"wrote plot to {args.plot}")
    if not args.out and not args.plot:
        last = smoothed[~np.isnan(smoothed)]
        print(f"{name}: {len(rows)} rows, last value {last[-1] if last.size else float('nan'):.6g}")
    return 0
