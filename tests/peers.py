"""Load the peer libraries' own EMA code for differential tests.

timm's and Ultralytics' package imports need torchvision/cv2, which do not work beside the CPU torch
wheel, so their EMA source is loaded from the installed file: timm's ``utils/model_ema.py`` whole (it
imports only torch), and Ultralytics' ``ModelEMA`` class (plus ``unwrap_model``) cut out of
``utils/torch_utils.py`` with ``ast`` and executed unchanged. Each loader returns None when the peer is
not installed, and tests skip.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import types
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def timm_model_ema() -> types.ModuleType | None:
    root = _package_dir("timm")
    if root is None:
        return None
    path = root / "utils" / "model_ema.py"
    spec = importlib.util.spec_from_file_location("_peer_timm_model_ema", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ultralytics_model_ema() -> type | None:
    root = _package_dir("ultralytics")
    if root is None:
        return None
    source = (root / "utils" / "torch_utils.py").read_text()
    tree = ast.parse(source)
    keep = [
        node
        for node in tree.body
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in {"ModelEMA", "unwrap_model", "copy_attr"}
    ]
    module = ast.Module(body=keep, type_ignores=[])
    namespace: dict[str, Any] = {
        "math": math,
        "deepcopy": deepcopy,
        "torch": torch,
        "nn": nn,
        "TORCH_2_0": True,
        "TORCH_2_4": True,
        "__name__": "_peer_ultralytics",
    }
    exec(compile(module, str(root / "utils" / "torch_utils.py"), "exec"), namespace)
    return namespace["ModelEMA"]  # type: ignore[no-any-return]
