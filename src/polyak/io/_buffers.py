"""Byte views of tensor memory for the checkpoint reader and writer, without numpy."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

__all__ = ["host_buffer"]


def host_buffer(tensor: Tensor) -> memoryview:
    """A writable byte view (no copy) of a contiguous CPU tensor's memory, which keeps the tensor alive.

    Built with ``ctypes`` rather than ``tensor.numpy()`` so that writing and reading checkpoints need no
    numpy (torch's wheels do not depend on it)."""
    flat = tensor.reshape(-1).view(torch.uint8)
    if flat.numel() == 0:
        return memoryview(bytearray())
    array = (ctypes.c_ubyte * flat.numel()).from_address(flat.data_ptr())
    array._polyak_owner = flat  # type: ignore[attr-defined]  # the view must not outlive the tensor
    return memoryview(array).cast("B")
