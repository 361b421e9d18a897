"""What only a CUDA device can check: bf16 and fp16 autocast there, precision=auto's choice, the GPU memory columns,
and the two LoRA paths agreeing on the GPU. Skipped without CUDA; benchmarks/gpu_check.sh runs them."""

from __future__ import annotations

import pytest
import torch

from conftest import merged_and_composed
from harness import adapters
from harness.adapters.lora import LoRALinear
from harness.run import run
from harness.train import bf16_supported, concrete_precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh)")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "auto"])
def test_a_run_on_cuda_trains_and_records_gpu_memory(make_cfg, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    row = run(make_cfg("device=cuda", f"train.precision={precision}", "train.group_by_length=true"))
    assert row["status"] == "ok", row["error"]
    assert row["device"].startswith("cuda:")
    assert row["cuda_peak_allocated_bytes"] > 0 and row["cuda_peak_reserved_bytes"] >= row["cuda_peak_allocated_bytes"]
    assert row["precision"] == concrete_precision(precision, torch.device("cuda"))


def test_auto_precision_on_cuda_is_bf16_from_ampere_on():
    device = torch.device("cuda")
    ampere = torch.cuda.get_device_capability(device)[0] >= 8
    assert bf16_supported(device) == (ampere and torch.cuda.is_bf16_supported())
    assert concrete_precision("auto", device) == ("bf16" if ampere else "fp32")


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_merged_and_composed_paths_agree_on_cuda(make_cfg, variant):
    cfg = make_cfg(f"variant={variant}", "variant.dropout=0.0")
    torch.manual_seed(0)
    layer = adapters.build(cfg.variant).make_layer("q", torch.nn.Linear(64, 48).requires_grad_(False)).cuda()
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 700, 64, device="cuda", requires_grad=True)
    outputs, grads = merged_and_composed(layer, x)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
    for merged, composed in zip(*grads):
        torch.testing.assert_close(merged, composed, rtol=1e-3, atol=1e-3)
    assert isinstance(layer, LoRALinear)
