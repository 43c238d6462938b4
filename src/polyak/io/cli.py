"""``polyak inspect | extract | convert``: look inside a checkpoint, pull out the averaged weights, and
convert between polyak and peer formats. Errors exit with code 2 and a one-line message."""

from __future__ import annotations

import argparse
import functools
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polyak import _state
from polyak._progress import Progress
from polyak._select import normalize_key
from polyak.io._checkpoint import Checkpoint, read, save
from polyak.io._exchange import write_state
from polyak.io._tree import same_tensor_key
from polyak.io.peers import averaged_weights, peer_state, raw_model_state

__all__ = ["add_commands"]

_PEER_STEP_KEYS = ("step", "num_updates", "optimization_step", "n_averaged", "updates")
_CONVERT_TARGETS = ("polyak", "timm", "ema_pytorch", "averaged_model", "state_dict")


def add_commands(subparsers: Any) -> None:
    inspect = subparsers.add_parser("inspect", help="show what a checkpoint holds (format, step, decay, tensors)")
    inspect.add_argument("checkpoint")
    inspect.add_argument("--trust-pickle", action="store_true", help="UNSAFE: allow pickled objects (Ultralytics)")
    inspect.add_argument("--max-tensors", type=int, default=40, help="how many tensors to list (default 40)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object (every tensor listed), for scripts")
    inspect.set_defaults(func=_inspect)

    extract = subparsers.add_parser("extract", help="write the averaged weights as a plain model checkpoint")
    extract.add_argument("checkpoint")
    extract.add_argument("-o", "--output", required=True, help="output file (.safetensors, or .pt/.pth)")
    extract.add_argument("--index", type=int, default=0, help="which average, for multi-decay EMAs (default 0)")
    extract.add_argument("--trust-pickle", action="store_true", help="UNSAFE: allow pickled objects (Ultralytics)")
    extract.add_argument("--quiet", action="store_true", help="no progress line (shown on a terminal after 1 s)")
    extract.set_defaults(func=_extract)

    convert = subparsers.add_parser("convert", help="convert a checkpoint to another library's EMA format")
    convert.add_argument("checkpoint")
    convert.add_argument("--to", required=True, choices=_CONVERT_TARGETS, dest="to")
    convert.add_argument("-o", "--output", required=True)
    convert.add_argument("--index", type=int, default=0, help="which average, for multi-decay EMAs (default 0)")
    convert.add_argument("--trust-pickle", action="store_true", help="UNSAFE: allow pickled objects (Ultralytics)")
    convert.add_argument("--quiet", action="store_true", help="no progress line (shown on a terminal after 1 s)")
    convert.set_defaults(func=_convert)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def averaged_from_checkpoint(
    ckpt: Checkpoint, index: int
) -> tuple[dict[str, Tensor], int | None, dict[str, Any] | None]:
    """(averaged weights keyed like the model, step, raw model weights or None) from any checkpoint.

    A polyak checkpoint is read as ``EMA.averaged_state_dict`` reads the live EMA (``polyak._state``):
    the debias correction applied (before the first update: the raw model's weights), every name of a
    tied tensor given its average, each average in its model tensor's dtype when the raw model is there.
    """
    if ckpt.kind != "polyak":
        weights, step = averaged_weights(ckpt.raw, ckpt.kind)
        return weights, step, raw_model_state(ckpt.raw, ckpt.kind)
    if ckpt.ema is None:
        raise ValueError("this polyak checkpoint holds no EMA state (saved without an EMA)")
    state = _state.parse(ckpt.ema, what="EMA state in the checkpoint")
    try:
        index = _state.check_index(index, state.num_averages)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--index: {exc}") from None
    raw = dict(ckpt.model) if isinstance(ckpt.model, Mapping) else None
    shadow = state.averages[index]
    keys = list(shadow)
    live = None
    if raw is not None:
        by_key = {normalize_key(str(k)): v for k, v in raw.items() if isinstance(v, Tensor)}
        if all(k in by_key for k in keys):
            live = [by_key[k] for k in keys]
    values = _state.debiased(
        [shadow[k] for k in keys],
        state.products[index],
        debias=bool(state.debias),
        live=live,
        what="this checkpoint's EMA",
    )
    averaged = dict(zip(keys, values))
    if raw is None:
        return averaged, state.step, None
    return _state.model_state_with(averaged, raw, aliases=_tied_names(raw, averaged)), state.step, raw


def _tied_names(raw: Mapping[str, Any], averaged: Mapping[str, Tensor]) -> dict[str, str]:
    """For each further name of a tied tensor in the raw model state (the same stored tensor under
    several keys, e.g. embedding = output head), the key of its one average."""
    first: dict[tuple[Any, ...], str] = {}
    for key, value in raw.items():
        if isinstance(value, Tensor) and value.numel() > 0 and normalize_key(str(key)) in averaged:
            first.setdefault(same_tensor_key(value), normalize_key(str(key)))
    return {
        str(key): first[same_tensor_key(value)]
        for key, value in raw.items()
        if isinstance(value, Tensor)
        and value.numel() > 0
        and normalize_key(str(key)) not in averaged
        and same_tensor_key(value) in first
    }


def _one_line(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Any failure of ``handler`` becomes a ValueError, which ``polyak`` prints as one line and exits 2:
    no file a user hands the CLI may end in a traceback."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except ValueError as exc:
            if "\n" not in str(exc):
                raise
            raise ValueError(" ".join(str(exc).split())) from None
        except Exception as exc:
            raise ValueError(" ".join(f"{type(exc).__name__}: {exc}".split())) from None

    return run


def _check_output(args: argparse.Namespace) -> None:
    """Refuse ``-o`` naming the input file: the input would be replaced before anyone noticed."""
    out, src = Path(args.output), Path(args.checkpoint)
    if out.exists() and src.exists() and os.path.samefile(out, src):
        raise ValueError(f"-o {args.output} is the input checkpoint; write the output to another file")


@_one_line
def _inspect(args: argparse.Namespace) -> int:
    ckpt = read(args.checkpoint, trust_pickle=args.trust_pickle)
    if args.json:
        return _inspect_json(args.checkpoint, ckpt)
    print(f"file:    {args.checkpoint}")
    print(f"format:  {ckpt.kind}")
    if ckpt.kind == "polyak" and isinstance(ckpt.ema, Mapping):
        ema = ckpt.ema
        config = ema.get("config") or {}
        print(f"step:    {ema.get('step')}  (skipped updates: {ema.get('skipped_updates', 0)})")
        print(f"decay:   {config.get('decay')}")
        others = {k: v for k, v in config.items() if k != "decay"}
        print(f"config:  {others}")
        print(f"averages: {len(ema.get('averages') or [])}")
    elif ckpt.kind != "polyak" and isinstance(ckpt.raw, Mapping):
        step = next((ckpt.raw[k] for k in _PEER_STEP_KEYS if k in ckpt.raw), None)
        if step is not None:
            print(f"step:    {int(step)}")
        if isinstance(ckpt.raw.get("decay"), (int, float)):
            print(f"decay:   {ckpt.raw['decay']}")
    print(f"sections: {', '.join(_sections(ckpt))}")
    if ckpt.metadata.get("checksum"):
        print(f"checksum: {ckpt.metadata['checksum']} (verified, header and tensors)")
    elif ckpt.metadata.get("sha256"):
        print(f"sha256:  {ckpt.metadata['sha256']} (verified, tensors)")
    tensors = _all_tensors(ckpt)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"tensors: {len(tensors)}, {_fmt_bytes(total)}")
    for name, t in list(tensors.items())[: args.max_tensors]:
        print(f"  {name:<60} {str(t.dtype).removeprefix('torch.'):<9} {list(t.shape)}")
    if len(tensors) > args.max_tensors:
        print(f"  ... {len(tensors) - args.max_tensors} more (--max-tensors)")
    try:
        averaged, _, raw = averaged_from_checkpoint(ckpt, 0)
    except ValueError:
        raw = None
    if raw is not None:
        _print_difference(averaged, raw)
    return 0


def _sections(ckpt: Any) -> list[str]:
    if ckpt.kind == "polyak":
        return [s for s in ("ema", "model", "optimizer", "extra") if getattr(ckpt, s) is not None]
    return [str(k) for k in ckpt.raw if not isinstance(ckpt.raw[k], Tensor)][:10] or ["tensors"]


def _all_tensors(ckpt: Any) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, Tensor):
            out[path] = node
        elif isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{path}.{i}" if path else str(i))
        elif isinstance(node, torch.nn.Module):
            walk(node.state_dict(), path)

    walk(ckpt.raw, "")
    return out


def _difference(
    averaged: Mapping[str, Tensor], raw: Mapping[str, Tensor]
) -> tuple[float, list[tuple[float, float, str]]]:
    """Relative L2 distance between raw and averaged weights: overall, and (rel, abs, key) per float tensor."""
    rows = []
    num = den = 0.0
    for key, r in raw.items():
        a = averaged.get(key)
        if not isinstance(r, Tensor) or a is None or not (r.is_floating_point() and a.is_floating_point()):
            continue
        diff = float((a.double() - r.double()).norm())
        size = float(r.double().norm())
        num += diff**2
        den += size**2
        rows.append((diff / size if size else diff, diff, key))
    overall = math.sqrt(num) / math.sqrt(den) if den else math.sqrt(num)
    return overall, rows


def _print_difference(averaged: Mapping[str, Tensor], raw: Mapping[str, Tensor]) -> None:
    """Relative L2 distance between raw and averaged weights, overall and the largest tensors."""
    overall, rows = _difference(averaged, raw)
    if not rows:
        return
    differing = sum(1 for rel, _, _ in rows if rel > 0)
    print(f"raw vs EMA: {differing}/{len(rows)} float tensors differ; relative L2 distance {overall:.3e}")
    for rel, diff, key in sorted(rows, reverse=True)[:5]:
        print(f"  {key:<60} rel {rel:.3e}  abs {diff:.3e}")


def _stages(args: argparse.Namespace) -> Progress:
    """The progress line of a conversion: three sections (read, average, write), drawn only when the
    work is large enough to take over a second, on a terminal, without ``--quiet``."""
    return Progress(3, f"{args.command}: reading", quiet=args.quiet)


def _next(bar: Progress, args: argparse.Namespace, stage: str) -> None:
    """The previous section is done; name the one that starts."""
    bar.label = f"{args.command}: {stage}"
    bar.advance()


@_one_line
def _extract(args: argparse.Namespace) -> int:
    _check_output(args)
    with _stages(args) as bar:
        ckpt = read(args.checkpoint, trust_pickle=args.trust_pickle)
        _next(bar, args, "averaging")
        averaged, _, raw = averaged_from_checkpoint(ckpt, args.index)
        _next(bar, args, "writing")
        write_state(args.output, averaged, kind="state_dict")
        bar.advance()
    print(f"wrote {len(averaged)} tensors to {args.output}")
    if raw is None and ckpt.kind == "polyak":
        print(
            "note: the checkpoint holds no raw model (saved without model=), so only the averaged tensors were "
            "written, in the shadow dtype; load them with model.load_state_dict(..., strict=False)"
        )
    return 0


@_one_line
def _convert(args: argparse.Namespace) -> int:
    _check_output(args)
    with _stages(args) as bar:
        ckpt = read(args.checkpoint, trust_pickle=args.trust_pickle)
        _next(bar, args, "averaging")
        averaged, step, raw = averaged_from_checkpoint(ckpt, args.index)
        _next(bar, args, "writing")
        _write_converted(args, ckpt, averaged, step, raw)
        bar.advance()
    print(f"wrote {args.to} checkpoint to {args.output}")
    return 0


def _write_converted(
    args: argparse.Namespace,
    ckpt: Checkpoint,
    averaged: dict[str, Tensor],
    step: int | None,
    raw: dict[str, Any] | None,
) -> None:
    if args.to == "polyak":
        shadows = {
            normalize_key(k): v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
            for k, v in averaged.items()
            if isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex())
        }
        state = _state.build(
            step=int(step or 0),
            skipped_updates=0,
            products=[0.0],
            last_decays=[0.0],
            config={"decay": ["unknown (converted from " + ckpt.kind + ")"], "debias": False},
            averages=[shadows],
        )
        save(args.output, state, model=raw)
    elif args.to == "state_dict":
        write_state(args.output, averaged, kind="state_dict")
    else:
        write_state(args.output, peer_state(args.to, averaged, step=int(step or 0), raw_model=raw), kind=args.to)


def _inspect_json(path: str, ckpt: Any) -> int:
    """``polyak inspect --json``: what the text form prints, as one JSON object on stdout."""
    import json

    out: dict[str, Any] = {"file": path, "format": ckpt.kind, "step": None, "decay": None}
    if ckpt.kind == "polyak" and isinstance(ckpt.ema, Mapping):
        config = dict(ckpt.ema.get("config") or {})
        out["step"] = ckpt.ema.get("step")
        out["skipped_updates"] = ckpt.ema.get("skipped_updates", 0)
        out["decay"] = config.pop("decay", None)
        out["config"] = config
        out["averages"] = len(ckpt.ema.get("averages") or [])
    elif ckpt.kind != "polyak" and isinstance(ckpt.raw, Mapping):
        step = next((ckpt.raw[k] for k in _PEER_STEP_KEYS if k in ckpt.raw), None)
        out["step"] = None if step is None else int(step)
        if isinstance(ckpt.raw.get("decay"), (int, float)):
            out["decay"] = ckpt.raw["decay"]
    out["sections"] = _sections(ckpt)
    # verified on read: the header and the tensors (checksum), or the tensors alone (sha256, older files)
    out["checksum"] = ckpt.metadata.get("checksum") or ckpt.metadata.get("sha256") or None
    tensors = _all_tensors(ckpt)
    out["bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
    out["tensors"] = [
        {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        for name, t in tensors.items()
    ]
    try:
        averaged, _, raw = averaged_from_checkpoint(ckpt, 0)
    except ValueError:
        raw = None
    out["raw_vs_ema"] = None
    if raw is not None:
        overall, rows = _difference(averaged, raw)
        if rows:
            out["raw_vs_ema"] = {
                "float_tensors": len(rows),
                "differing": sum(1 for rel, _, _ in rows if rel > 0),
                "relative_l2": overall,
            }
    print(json.dumps(out, indent=2, default=str))
    return 0
