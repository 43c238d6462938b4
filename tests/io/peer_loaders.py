"""Load peer EMA code that cannot be imported as a package here (timm and Ultralytics import
torchvision/cv2 at package level). timm's ``utils/model_ema.py`` imports only torch and is loaded whole
from its file; Ultralytics' ``ModelEMA`` (with ``unwrap_model``/``copy_attr``) is cut out of
``utils/torch_utils.py`` with ``ast`` and executed unchanged. Each returns None when not installed."""

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
    spec = importlib.util.spec_from_file_location("_peer_timm_model_ema", root / "utils" / "model_ema.py")
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ultralytics_model_ema() -> Any:
    root = _package_dir("ultralytics")
    if root is None:
        return None
    path = root / "utils" / "torch_utils.py"
    tree = ast.parse(path.read_text())
    keep = [
        node
        for node in tree.body
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in {"ModelEMA", "unwrap_model", "copy_attr"}
    ]
    namespace: dict[str, Any] = {
        "math": math,
        "deepcopy": deepcopy,
        "torch": torch,
        "nn": nn,
        "TORCH_2_0": True,
        "TORCH_2_4": True,
        "__name__": "_peer_ultralytics",
    }
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), namespace)
    return namespace["ModelEMA"]
