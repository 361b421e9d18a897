"""Memory meters (harness/meters.py)."""

from __future__ import annotations

import torch

from harness.meters import SavedTensorMeter


def test_saved_tensor_meter_counts_shared_storage_once():
    linear = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorMeter(linear) as meter:
        (x * x).sum()  # x saved twice by one mul: one storage
    assert meter.bytes == x.numel() * 4
