"""Time one EMA update: polyak vs the bandwidth limit (flat lerp), ``_foreach_lerp_`` and installed peers.

Three parameter layouts (from issue 4), built on the meta device and filled locally (no downloads):

* ``resnet50``: the 161 parameter tensors of ResNet-50 (25.6M floats);
* ``gpt``: a GPT-2-style decoder, d=768, 12 layers, 16K vocabulary, tied head: 148 tensors, ~98M floats;
* ``many_small``: 2,500 ``Linear(28, 28)``: 5,000 tensors, 2.0M floats.

Implementations run interleaved in rounds (shuffled order each round); each round's time is divided by
the flat lerp's time in the same round, so drifting machine load cancels. Reported: median ms, median
ratio to flat lerp, and noise = (p75 - p25) / median of the ratios.

polyak rows: ``polyak`` is the default configuration (``nonfinite="raise"``: every update checks for
NaN/inf); ``polyak ignore`` skips that check (``nonfinite="ignore"``), so their difference is the cost of
the check; ``polyak flatten`` is the opt-in ``EMA(..., flatten=True)`` (default check), ``polyak flatten
ignore`` the same without the check.
``polyak K=4`` keeps four decays; its ratio is also reported against ``polyak`` (K=1).

Memory passes: ``flat sum`` reads every weight once (the finiteness check as a pass of its own);
``flat sum, then lerp`` decides before it writes (two reads of every weight: what keeping a refused
update a bit-exact no-op costs once the weights exceed the cache); ``flat blocked sum+lerp`` checks and
lerps one cache-sized block at a time (one read, but a NaN in a later block leaves the earlier ones
updated, so it does not keep that guarantee).

Bandwidth: "GB/s" is the least traffic of one update (12 bytes per fp32 weight; 4 + 8K for K averages;
8 for the copy) over its median time. "of copy" compares it with a flat ``copy_`` timed in the same
rounds, the usual measure of achievable bandwidth on a GPU; on a CPU a copy also reads each target line
before writing it (write-allocate), so in-place updates can exceed 100% there. On CUDA, "of peak" divides
by the device's theoretical bandwidth (memory clock x bus width, when torch reports them): issue 4's goal
is >= 85% for polyak there.

Usage: python benchmarks/bench_update.py [--shapes resnet50,gpt,many_small] [--rounds 15] [--device cuda]
       [--out benchmarks/results/update.json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.peers (loads timm's / Ultralytics' EMA source by file path)

DECAY = 0.999


# --- model layouts ---------------------------------------------------------------------------------------
class Params(nn.Module):
    """A bag of named parameters (the layout is all an EMA update sees)."""

    def __init__(self, shapes: list[tuple[str, tuple[int, ...]]]) -> None:
        super().__init__()
        for name, shape in shapes:
            self.register_parameter(name.replace(".", "_"), nn.Parameter(torch.empty(shape, device="meta")))


def resnet50_shapes() -> list[tuple[str, tuple[int, ...]]]:
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("conv1.weight", (64, 3, 7, 7)),
        ("bn1.weight", (64,)),
        ("bn1.bias", (64,)),
    ]
    in_ch = 64
    for stage, (blocks, width) in enumerate(zip([3, 4, 6, 3], [64, 128, 256, 512])):
        for b in range(blocks):
            p = f"layer{stage + 1}.{b}"
            shapes += [
                (f"{p}.conv1.weight", (width, in_ch, 1, 1)),
                (f"{p}.bn1.weight", (width,)),
                (f"{p}.bn1.bias", (width,)),
            ]
            shapes += [
                (f"{p}.conv2.weight", (width, width, 3, 3)),
                (f"{p}.bn2.weight", (width,)),
                (f"{p}.bn2.bias", (width,)),
            ]
            shapes += [(f"{p}.conv3.weight", (4 * width, width, 1, 1))]
            shapes += [(f"{p}.bn3.weight", (4 * width,)), (f"{p}.bn3.bias", (4 * width,))]
            if b == 0:
                shapes += [(f"{p}.downsample.0.weight", (4 * width, in_ch, 1, 1))]
                shapes += [(f"{p}.downsample.1.weight", (4 * width,)), (f"{p}.downsample.1.bias", (4 * width,))]
            in_ch = 4 * width
    shapes += [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    return shapes


def gpt_shapes(
    d: int = 768, layers: int = 12, vocab: int = 16384, context: int = 1024
) -> list[tuple[str, tuple[int, ...]]]:
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte", (vocab, d)), ("wpe", (context, d))]
    for i in range(layers):
        p = f"h.{i}"
        shapes += [(f"{p}.ln_1.weight", (d,)), (f"{p}.ln_1.bias", (d,))]
        shapes += [(f"{p}.attn.c_attn.weight", (3 * d, d)), (f"{p}.attn.c_attn.bias", (3 * d,))]
        shapes += [(f"{p}.attn.c_proj.weight", (d, d)), (f"{p}.attn.c_proj.bias", (d,))]
        shapes += [(f"{p}.ln_2.weight", (d,)), (f"{p}.ln_2.bias", (d,))]
        shapes += [(f"{p}.mlp.c_fc.weight", (4 * d, d)), (f"{p}.mlp.c_fc.bias", (4 * d,))]
        shapes += [(f"{p}.mlp.c_proj.weight", (d, 4 * d)), (f"{p}.mlp.c_proj.bias", (d,))]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def build(shape: str, device: torch.device | str = "cpu") -> nn.Module:
    if shape == "many_small":
        with torch.device("meta"):
            model: nn.Module = nn.Sequential(*[nn.Linear(28, 28) for _ in range(2500)])
    elif shape == "resnet50":
        model = Params(resnet50_shapes())
    elif shape == "gpt":
        model = Params(gpt_shapes())
    else:
        raise ValueError(f"unknown shape {shape!r}")
    model = model.to_empty(device=device)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)  # filled on the CPU, copied to the device
    return model


# --- implementations: each returns a zero-argument update function ---------------------------------------
def impl_flat_lerp(model: nn.Module) -> Callable[[], None]:
    source = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shadow = source.clone()

    def update() -> None:
        shadow.lerp_(source, 1 - DECAY)

    return update


def impl_flat_copy(model: nn.Module) -> Callable[[], None]:
    """The achievable memory bandwidth: one flat ``copy_`` (reads and writes 4 bytes per fp32 weight)."""
    source = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    target = torch.empty_like(source)
    return lambda: target.copy_(source)


def impl_flat_sum(model: nn.Module) -> Callable[[], None]:
    """Reading every weight once (a finiteness screen run as its own pass)."""
    source = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return lambda: bool(source.sum().isfinite()) and None


def impl_flat_check_lerp(model: nn.Module) -> Callable[[], None]:
    """Decide, then write: a finiteness pass over all weights, then the lerp (two reads of every weight).
    Any update that leaves every average unchanged when a weight is not finite pays at least this when
    the weights do not fit in the cache: the last weight must be read before the first shadow is written."""
    source = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shadow = source.clone()

    def update() -> None:
        if bool(source.sum().isfinite()):
            shadow.lerp_(source, 1 - DECAY)

    return update


BLOCK = 1 << 17  # 512 KB of fp32 per block: 256 KB per thread on 2 threads, within a core's L2


def impl_flat_blocked(model: nn.Module) -> Callable[[], None]:
    """Check a cache-sized block, then lerp it while it is in cache (one read of every weight). A NaN
    found in block j leaves blocks 0..j-1 updated: this design does not keep a refused update a no-op."""
    source = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shadow = source.clone()
    pairs = list(zip(source.split(BLOCK), shadow.split(BLOCK)))

    def update() -> None:
        for src, dst in pairs:
            if not bool(src.sum().isfinite()):
                return
            dst.lerp_(src, 1 - DECAY)

    return update


def impl_foreach(model: nn.Module) -> Callable[[], None]:
    params = [p.detach() for p in model.parameters()]
    shadows = [p.clone() for p in params]
    return lambda: torch._foreach_lerp_(shadows, params, 1 - DECAY)


def impl_polyak(**kwargs: Any) -> Callable[[nn.Module], Callable[[], None]]:
    def make(model: nn.Module) -> Callable[[], None]:
        from polyak import EMA

        target = copy.deepcopy(model) if kwargs.get("flatten") else model
        ema = EMA(target, **kwargs)
        return ema.update

    return make


def peer_impls() -> dict[str, Callable[[nn.Module], Callable[[], None]]]:
    out: dict[str, Callable[[nn.Module], Callable[[], None]]] = {}
    from tests import peers

    timm_mod = peers.timm_model_ema()
    if timm_mod is not None:

        def timm_v3(model: nn.Module) -> Callable[[], None]:
            ema = timm_mod.ModelEmaV3(model, decay=DECAY)
            return lambda: ema.update(model)

        out["timm ModelEmaV3"] = timm_v3
    try:
        from ema_pytorch import EMA as LucidEMA

        def lucid(model: nn.Module) -> Callable[[], None]:
            ema = LucidEMA(model, beta=DECAY, update_after_step=0, update_every=1)
            return ema.update

        out["ema-pytorch"] = lucid
    except ImportError:
        pass
    try:
        from torch_ema import ExponentialMovingAverage

        def torch_ema(model: nn.Module) -> Callable[[], None]:
            ema = ExponentialMovingAverage(model.parameters(), decay=DECAY, use_num_updates=False)
            return ema.update

        out["torch_ema"] = torch_ema
    except ImportError:
        pass

    def averaged_model(model: nn.Module) -> Callable[[], None]:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
        return lambda: ema.update_parameters(model)

    out["AveragedModel"] = averaged_model
    try:
        from diffusers.training_utils import EMAModel

        def diffusers(model: nn.Module) -> Callable[[], None]:
            ema = EMAModel(model.parameters(), decay=DECAY, use_ema_warmup=False, foreach=True)
            params = list(model.parameters())
            return lambda: ema.step(params)

        out["diffusers EMAModel"] = diffusers
    except ImportError:
        pass
    ultra = peers.ultralytics_model_ema()
    if ultra is not None:

        def ultralytics(model: nn.Module) -> Callable[[], None]:
            ema = ultra(model, decay=DECAY)
            return lambda: ema.update(model)

        out["Ultralytics ModelEMA"] = ultralytics
    return out


# --- timing ----------------------------------------------------------------------------------------------
def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_rounds(
    fns: dict[str, Callable[[], None]], rounds: int, seed: int, sync: Callable[[], None] = lambda: None
) -> dict[str, list[float]]:
    """Wall time of each call, implementations shuffled in every round; ``sync`` waits for the device
    (CUDA) before the clock starts and before it stops."""
    rng = random.Random(seed)
    names = list(fns)
    for name in names:  # warm-up: allocations, first-touch, lazy state
        for _ in range(2):
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def peak_bandwidth_gb_per_s(device: torch.device) -> float | None:
    """A CUDA device's theoretical memory bandwidth (double data rate x bus width), when torch reports
    the memory clock and bus width; None elsewhere."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def bytes_per_update(name: str, n_params: int) -> int:
    """The least memory traffic of one update of fp32 weights: read weight + read and write shadow
    (12 bytes per weight); K averages read the weight once (4 + 8K); a copy reads and writes 8."""
    if name == "flat copy":
        return 8 * n_params
    if name == "flat sum":
        return 4 * n_params
    if name == "flat sum, then lerp":
        return 16 * n_params
    if name == "polyak K=4":
        return (4 + 8 * 4) * n_params
    return 12 * n_params


def bench_shape(shape: str, rounds: int, with_peers: bool, device: torch.device) -> dict[str, Any]:
    model = build(shape, device)
    sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    makers: dict[str, Callable[[nn.Module], Callable[[], None]]] = {
        "flat lerp": impl_flat_lerp,
        "flat copy": impl_flat_copy,
        "flat sum": impl_flat_sum,
        "flat sum, then lerp": impl_flat_check_lerp,
        "flat blocked sum+lerp": impl_flat_blocked,
        "_foreach_lerp_": impl_foreach,
        "polyak": impl_polyak(decay=DECAY),
        "polyak ignore": impl_polyak(decay=DECAY, nonfinite="ignore"),
        "polyak flatten": impl_polyak(decay=DECAY, flatten=True),
        "polyak flatten ignore": impl_polyak(decay=DECAY, flatten=True, nonfinite="ignore"),
        "polyak K=4": impl_polyak(decay=[0.99, 0.999, 0.9999, 0.99999]),
    }
    results: dict[str, Any] = {}
    own = {name: make(model) for name, make in makers.items()}
    own_times = time_rounds(own, rounds, seed=1, sync=sync)
    del own
    gc.collect()
    all_times = dict(own_times)
    if with_peers:  # one peer at a time beside flat lerp (their deep copies need memory)
        for name, make in peer_impls().items():
            fns = {"flat lerp": impl_flat_lerp(model), name: make(model)}
            t = time_rounds(fns, rounds, seed=2, sync=sync)
            all_times[name] = t[name]
            all_times[f"flat lerp (with {name})"] = t["flat lerp"]
            del fns
            gc.collect()
    for name, ts in all_times.items():
        if name.startswith("flat lerp ("):
            continue
        ref_key = "flat lerp" if name in own_times else f"flat lerp (with {name})"
        ratios = [t / r for t, r in zip(ts, all_times[ref_key])]
        med = statistics.median(ratios)
        results[name] = {
            "median_ms": 1e3 * statistics.median(ts),
            "ratio_to_flat_lerp": med,
            "noise": (quantile(ratios, 0.75) - quantile(ratios, 0.25)) / med,
            "effective_GB_per_s": bytes_per_update(name, n_params) / statistics.median(ts) / 1e9,
        }
    copy_rate = results["flat copy"]["effective_GB_per_s"]
    peak = peak_bandwidth_gb_per_s(device)
    for r in results.values():  # the bandwidth fraction, against the copy measured in the same rounds
        r["fraction_of_copy_bandwidth"] = r["effective_GB_per_s"] / copy_rate
        if peak is not None:
            r["fraction_of_peak_bandwidth"] = r["effective_GB_per_s"] / peak
    k4 = [a / b for a, b in zip(own_times["polyak K=4"], own_times["polyak"])]
    results["polyak K=4"]["ratio_to_polyak_K1"] = statistics.median(k4)
    entry: dict[str, Any] = {"shape": shape, "params": n_params, "tensors": n_tensors, "results": results}
    peers = [n for n in results if n not in own_times]
    if peers:  # each peer's ratio over polyak's, both measured against flat lerp in their own rounds
        fastest = min(peers, key=lambda n: results[n]["ratio_to_flat_lerp"])
        entry["fastest_peer"] = fastest
        entry["speedup_over_fastest_peer"] = {
            n: results[fastest]["ratio_to_flat_lerp"] / results[n]["ratio_to_flat_lerp"]
            for n in own_times
            if n.startswith("polyak")
        }
    return entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="resnet50,gpt,many_small")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "update.json")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (weights, shadows and peers on it)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    machine = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_GB_per_s": peak_bandwidth_gb_per_s(device),
    }
    report = {"machine": machine, "decay": DECAY, "rounds": args.rounds, "shapes": []}
    for shape in args.shapes.split(","):
        entry = bench_shape(shape, args.rounds, with_peers=not args.no_peers, device=device)
        report["shapes"].append(entry)
        print(f"\n{shape}: {entry['params'] / 1e6:.1f}M params in {entry['tensors']} tensors")
        with_peak = machine["peak_GB_per_s"] is not None
        print(
            "| implementation | ms/update | × flat lerp | noise | GB/s | of copy |"
            + (" of peak |" if with_peak else "")
            + "\n|---|---|---|---|---|---|"
            + ("---|" if with_peak else "")
        )
        for name, r in sorted(entry["results"].items(), key=lambda kv: kv[1]["ratio_to_flat_lerp"]):
            extra = f" ({r['ratio_to_polyak_K1']:.2f}× polyak K=1)" if "ratio_to_polyak_K1" in r else ""
            peak_cell = f" {r['fraction_of_peak_bandwidth']:.0%} |" if with_peak else ""
            print(
                f"| {name} | {r['median_ms']:.2f} | {r['ratio_to_flat_lerp']:.2f}{extra} | {r['noise']:.2f} "
                f"| {r['effective_GB_per_s']:.1f} | {r['fraction_of_copy_bandwidth']:.0%} |{peak_cell}"
            )
        if "fastest_peer" in entry:
            speedups = ", ".join(f"{n} {x:.1f}×" for n, x in entry["speedup_over_fastest_peer"].items())
            print(f"speed-up over the fastest peer ({entry['fastest_peer']}): {speedups}")
        sys.stdout.flush()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
