"""Copies of a batch's tensors to the training or embedding device. To a GPU they go through pinned memory,
queued (non_blocking): a copy from pageable memory waits until the GPU has finished all the work queued
before it, a host sync for every copy of every step."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """t on `device` (to a GPU: pinned, queued)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def csr_to_device(x: torch.Tensor, device) -> torch.Tensor:
    """A sparse CSR tensor on `device`, its three arrays moved by to_device."""
    if torch.device(device).type != "cuda":
        return x.to(device)
    parts = (to_device(p, device) for p in (x.crow_indices(), x.col_indices(), x.values()))
    return torch.sparse_csr_tensor(*parts, x.shape, check_invariants=False)
