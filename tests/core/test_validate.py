"""The shared argument checks: which values pass, what they become, and what each error says."""

import math

import numpy as np
import pytest
import torch

from polyak._validate import as_bool, as_float, as_int


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), np.uint8(3)])
def test_as_int_accepts_integers_and_returns_python_int(value: object) -> None:
    result = as_int(value, "k")
    assert result == 3
    assert type(result) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), 3.0, "3", None, torch.tensor(3), np.float64(3.0)])
def test_as_int_refuses_non_integers_naming_the_argument(value: object) -> None:
    with pytest.raises(TypeError, match="update_every must be an int"):
        as_int(value, "update_every")


def test_as_int_range_errors_name_the_bound() -> None:
    with pytest.raises(ValueError, match="start_step must be >= 0, got -1"):
        as_int(-1, "start_step", minimum=0)
    with pytest.raises(ValueError, match="index must be <= 2, got 3"):
        as_int(3, "index", maximum=2)
    assert as_int(0, "start_step", minimum=0) == 0


@pytest.mark.parametrize("value", [0.5, 1, np.float32(0.5), np.int64(1), np.float64(0.25)])
def test_as_float_accepts_reals_and_returns_python_float(value: object) -> None:
    result = as_float(value, "decay")
    assert result == float(value)  # type: ignore[arg-type]
    assert type(result) is float


@pytest.mark.parametrize("value", [True, np.bool_(False), "0.5", None, torch.tensor(0.5), [0.5]])
def test_as_float_refuses_non_numbers(value: object) -> None:
    with pytest.raises(TypeError, match="decay must be a real number"):
        as_float(value, "decay")


def test_as_float_refuses_nan_inf_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="must be finite"):
        as_float(math.nan, "decay")
    with pytest.raises(ValueError, match="must be finite"):
        as_float(math.inf, "decay")
    with pytest.raises(ValueError, match="decay must be <= 1.0"):
        as_float(1.5, "decay", minimum=0.0, maximum=1.0)
    with pytest.raises(ValueError, match="decay must be >= 0.0"):
        as_float(-0.1, "decay", minimum=0.0, maximum=1.0)
    assert as_float(math.inf, "halflife", finite=False) == math.inf
    with pytest.raises(ValueError, match="must be finite"):
        as_float(math.nan, "halflife", finite=False)


def test_as_bool() -> None:
    assert as_bool(np.bool_(True), "debias") is True
    assert as_bool(False, "debias") is False
    with pytest.raises(TypeError, match="debias must be True or False"):
        as_bool(1, "debias")
