"""Data sets made or bundled locally (no downloads), split 70/15/15 and standardised on the train part.

- ``regression``: ``sklearn.datasets.make_regression(n_samples=1000, n_features=20, noise=0.1)``, inputs
  and target standardised (the target's scale is why a reported MSE is small).
- ``digits``: ``sklearn.datasets.load_digits`` (1,797 8x8 images, 10 classes).
- ``mnist1d``: the ``mnist1d`` package's generator (Greydanus 2020), 40-sample 1-D digit signals, 10 classes.

The data of seed ``s`` (its draw and its split) depends only on ``s``, so raw and averaged models of one
seed see the same data and their difference is a paired comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["DATASETS", "Split", "Task", "load"]

Task = Literal["regression", "classification"]
DATASETS: tuple[str, ...] = ("regression", "digits", "mnist1d")


@dataclass(frozen=True)
class Split:
    """Train/validation/test tensors of one seed; ``y`` is float (N, 1) for regression, int64 (N,) else."""

    task: Task
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int  # 0 for regression

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


def _split(x: np.ndarray, y: np.ndarray, seed: int, task: Task, num_classes: int, standardise_y: bool) -> Split:
    """Shuffle with ``seed``, cut 70/15/15, standardise x (and y when asked) with train statistics."""
    n = len(x)
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_val = round(0.70 * n), round(0.15 * n)
    parts = np.split(order, [n_train, n_train + n_val])
    mean, std = x[parts[0]].mean(0), x[parts[0]].std(0)
    std = np.where(std > 0, std, 1.0)
    xs = [torch.tensor((x[p] - mean) / std, dtype=torch.float32) for p in parts]
    if task == "regression":
        y_mean, y_std = (y[parts[0]].mean(), y[parts[0]].std()) if standardise_y else (0.0, 1.0)
        ys = [torch.tensor((y[p] - y_mean) / y_std, dtype=torch.float32).unsqueeze(1) for p in parts]
    else:
        ys = [torch.tensor(y[p], dtype=torch.int64) for p in parts]
    return Split(task, xs[0], ys[0], xs[1], ys[1], xs[2], ys[2], num_classes)


def load(name: str, seed: int, num_samples: int | None = None) -> Split:
    """The split of data set ``name`` for ``seed``; ``num_samples`` subsamples (tests, quick runs)."""
    if name == "regression":
        from sklearn.datasets import make_regression

        n = 1000 if num_samples is None else num_samples
        x, y = make_regression(n_samples=n, n_features=20, noise=0.1, random_state=seed)
        return _split(x, y, seed, "regression", 0, standardise_y=True)
    if name == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        if num_samples is not None:
            keep = np.random.default_rng(seed + 10_000).permutation(len(x))[:num_samples]
            x, y = x[keep], y[keep]
        return _split(x.astype(np.float64), y, seed, "classification", 10, standardise_y=False)
    if name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.seed = seed
        args.num_samples = 4000 if num_samples is None else max(num_samples, 20)
        state = np.random.get_state()  # noqa: NPY002 - mnist1d seeds numpy's global generator; leave it as it was
        try:
            data = make_dataset(args)
        finally:
            np.random.set_state(state)  # noqa: NPY002
        x = np.concatenate([data["x"], data["x_test"]]).astype(np.float64)
        y = np.concatenate([data["y"], data["y_test"]])
        return _split(x, y, seed, "classification", 10, standardise_y=False)
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
