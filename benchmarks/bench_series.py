"""Speed of polyak.series against scipy.signal.lfilter and pandas, measured side by side.

Prints a table of median times and ratios (ours / reference) and writes JSON. Absolute times on a shared
machine are noisy; read the ratios, which are measured in the same rounds.

    python benchmarks/bench_series.py [--n 10000000] [--rounds 5] [--json benchmarks/results/series.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy.signal import lfilter

from polyak import series


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rounds(cases: dict[str, Callable[[], object]], n_rounds: int) -> dict[str, float]:
    """Interleave the cases in each round; return the median seconds of each."""
    for fn in cases.values():
        fn()  # warm up
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(n_rounds):
        for name, fn in cases.items():
            samples[name].append(timed(fn))
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=10_000_000, help="points in the long series")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default="benchmarks/results/series.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results: dict[str, object] = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "n": args.n}

    x = rng.normal(size=args.n)
    beta = 1.0 - 2.0 / 21.0  # span 20
    s = pd.Series(x)
    long = rounds(
        {
            "polyak ema adjust=True": lambda: series.ema(x, span=20),
            "polyak ema adjust=False": lambda: series.ema(x, span=20, adjust=False),
            "scipy lfilter (adjust=False)": lambda: lfilter([1 - beta], [1, -beta], x, zi=[beta * x[0]]),
            "pandas ewm adjust=True": lambda: s.ewm(span=20).mean(),
            "pandas ewm adjust=False": lambda: s.ewm(span=20, adjust=False).mean(),
        },
        args.rounds,
    )
    results["long_series_seconds"] = long

    many = rng.normal(size=(10_000, 100))
    frame = pd.DataFrame(many.T)
    short = rounds(
        {
            "polyak ema (10k series x 100)": lambda: series.ema(many, span=20),
            "pandas DataFrame.ewm (10k columns)": lambda: frame.ewm(span=20).mean(),
            "pandas per-series loop": lambda: [pd.Series(row).ewm(span=20).mean() for row in many[:1000]],
        },
        args.rounds,
    )
    short["pandas per-series loop"] *= 10  # timed on 1,000 of the 10,000 series
    results["many_short_series_seconds"] = short

    streams: dict[str, float] = {}
    for n_streams in (1, 1000, 100_000):
        stream = series.EWMStream(n_streams, span=20)
        values = rng.normal(size=(200, n_streams))

        def run(stream: series.EWMStream = stream, values: np.ndarray = values) -> None:
            for row in values:
                stream.update(row)

        seconds = rounds({"s": run}, args.rounds)["s"]
        streams[str(n_streams)] = values.size / seconds
    scalar_stream = series.EWMStream(span=20)  # shape (): one stream fed Python floats (its fast path)
    scalar_values = rng.normal(size=2000).tolist()

    def run_scalar(stream: series.EWMStream = scalar_stream, values: list[float] = scalar_values) -> None:
        for value in values:
            stream.update(value)

    streams["1 (shape (), floats)"] = len(scalar_values) / rounds({"s": run_scalar}, args.rounds)["s"]
    results["stream_updates_per_second"] = streams

    print(f"long series, {args.n:,} float64 points (median of {args.rounds} interleaved rounds):")
    ref = long["scipy lfilter (adjust=False)"]
    for name, sec in long.items():
        print(f"  {name:34s} {sec * 1e3:9.1f} ms   {sec / ref:5.2f}x lfilter")
    print("many short series, 10,000 x 100:")
    ours = short["polyak ema (10k series x 100)"]
    for name, sec in short.items():
        print(f"  {name:34s} {sec * 1e3:9.1f} ms   {sec / ours:7.1f}x polyak")
    print("streaming EWMStream.update (values per second, 200 updates):")
    for n_streams, rate in streams.items():
        print(f"  {n_streams:>20s} streams: {rate:,.0f} values/s")
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
