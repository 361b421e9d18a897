"""QLoRA (Dettmers et al., 2023): LoRA on a base whose frozen linear weights are stored quantized.

Every linear layer of the encoder (the task head excepted) keeps its weight in 4-bit NormalFloat (NF4) with
double quantization (the per-block absmax scales are themselves quantized), or in int8 per output row; the
LoRA adapters and the task head stay fp32. Weights are dequantized on the fly, one layer at a time, and the
base's matmuls run in the compute dtype (`variant.compute_dtype`): bf16 where the device has it, as the paper's
(bitsandbytes' `bnb_4bit_compute_dtype=torch.bfloat16`), else fp32; the layer's output is cast back to its
input's dtype, as bitsandbytes' Linear4bit does.

The adapter config (targets, r, alpha, dropout) is LoRA's (conf/variant/qlora.yaml includes lora.yaml), so a
qlora row differs from the lora row beside it by the quantized base alone; the paper's adapter is recipe=qlora_paper.

Backends: torchao's NF4 and int8 tensors (CPU and CUDA; what torchtune uses for QLoRA), or bitsandbytes
on CUDA when it is installed. Where neither can run, building the variant raises a ConfigError.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness import hardware
from harness.adapters.base import AdapterLinear, Prepared, is_under, register, weight_bytes
from harness.adapters.inject import replace_modules
from harness.adapters.lora import LoRA, LoRALinear
from harness.errors import ConfigError, require

log = logging.getLogger(__name__)

QUANT_TYPES = ("nf4", "int8")
BACKENDS = ("auto", "torchao", "bitsandbytes")
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_compute_dtype(requested: str, device: torch.device) -> str:
    """`auto` -> bf16 where `device` has it in hardware, else fp32; bf16 and fp32 as asked."""
    if requested != "auto":
        return requested
    return "bf16" if hardware.bf16_supported(device) else "fp32"


# ---- torchao ------------------------------------------------------------------------------------------
def dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if hasattr(weight, "get_original_weight"):  # torchao NF4Tensor
        return weight.get_original_weight().to(dtype)
    return weight.dequantize(dtype)  # torchao Int8Tensor


class FrozenQuantizedMatmul(torch.autograd.Function):
    """x W^T for a frozen quantized W, dequantized in forward and again in backward (for dL/dx = dL/dy W) rather
    than kept: no full-precision copy of W lives between the two, as in torchao's `linear_nf4`. The weight rides
    on ctx instead of `save_for_backward`: it is a constant, not an activation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.weight = weight
        return F.linear(x, dequantize(weight, x.dtype))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_x = grad_output @ dequantize(ctx.weight, grad_output.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None


class TorchaoQuantizedLinear(nn.Linear):
    """A frozen nn.Linear whose weight is a torchao NF4 or int8 tensor.

    The quantized tensor is stored as its parts (codes, scales, ...), each a plain buffer, and rebuilt on
    access: `.to(device)` moves plain tensors, byte accounts see the real sizes, and the trainer's
    saved-tensor meter (which reads storages) never meets a storage-less tensor subclass.
    """

    def __init__(self, linear: nn.Linear, quant_type: str, block_size: int, scaler_block_size: int,
                 compute_dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)  # not nn.Linear.__init__: no full-precision weight is ever allocated
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quant_type = quant_type
        self.compute_dtype = compute_dtype
        quantized = quantize_with_torchao(linear.weight.detach(), quant_type, block_size, scaler_block_size)
        self.parts, self.metadata = quantized.__tensor_flatten__()
        self.kind = type(quantized)
        for part in self.parts:
            self.register_buffer(f"weight_{part}", getattr(quantized, part))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        inner = {part: getattr(self, f"weight_{part}") for part in self.parts}
        metadata = self.metadata
        if "tensor_meta" in metadata:  # NF4 records its device in its metadata: follow the buffers after .to()
            device = next(iter(inner.values())).device
            metadata = {**metadata, "tensor_meta": dataclasses.replace(metadata["tensor_meta"], device=device)}
        return self.kind.__tensor_unflatten__(inner, metadata, torch.Size((self.out_features, self.in_features)),
                                              (self.in_features, 1))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = FrozenQuantizedMatmul.apply(x.to(self.compute_dtype), self.weight).to(x.dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.quant_type}, "
                f"compute={str(self.compute_dtype).removeprefix('torch.')}, bias={self.bias is not None}")


def quantize_with_torchao(weight: torch.Tensor, quant_type: str, block_size: int, scaler_block_size: int):
    if quant_type == "int8":
        from torchao.quantization import Int8Tensor, PerRow

        return Int8Tensor.from_hp(weight, PerRow())  # symmetric, one scale per output row
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    if weight.numel() % block_size:
        raise ConfigError(f"NF4 needs each weight's size to be a multiple of variant.block_size={block_size}; a "
                          f"{tuple(weight.shape)} weight is not: set variant.block_size to a divisor of it or use "
                          "variant.quant=int8")
    # torchao double-quantizes the per-block scales in groups of scaler_block_size, which must divide the number
    # of blocks; small layers (the tiny test model) get the largest group size that does.
    n_blocks = weight.numel() // block_size
    groups = math.gcd(n_blocks, scaler_block_size)
    if groups != scaler_block_size:
        log.info("NF4: %s weight has %d blocks; scales double-quantized in groups of %d instead of %d",
                 tuple(weight.shape), n_blocks, groups, scaler_block_size)
    return to_nf4(weight.contiguous(), block_size, groups)


# ---- bitsandbytes (CUDA) ------------------------------------------------------------------------------
def bitsandbytes_quantized_linear(linear: nn.Linear, quant_type: str, double_quant: bool,
                                  compute_dtype: torch.dtype = torch.float32) -> nn.Linear:
    """bitsandbytes' Linear4bit (NF4) / Linear8bitLt holding `linear`'s weight; it quantizes on the move to CUDA.
    (Not exercised on this project's CPU machines.)"""
    import bitsandbytes as bnb

    has_bias = linear.bias is not None
    if quant_type == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                  compress_statistics=double_quant, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=double_quant,
                                         quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


def resolve_backend(requested: str) -> str:
    """The backend that will quantize: bitsandbytes on CUDA when installed (for `auto`), else torchao."""
    has_cuda = torch.cuda.is_available()
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if requested in ("auto", "bitsandbytes") and has_cuda and has_bnb:
        return "bitsandbytes"
    if requested == "bitsandbytes":
        missing = "no CUDA device" if not has_cuda else "bitsandbytes is not installed (pip install bitsandbytes)"
        raise ConfigError(f"variant.backend=bitsandbytes cannot run here: {missing}. Use variant.backend=torchao "
                          "(CPU and CUDA; pip install torchao) or variant.backend=auto")
    try:
        from torchao.quantization import Int8Tensor  # noqa: F401
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            "variant=qlora needs a quantization backend and none can run here: install torchao "
            "(pip install torchao, or pip install -e '.[quant]'; CPU and CUDA), or bitsandbytes on a CUDA machine. "
            f"(import failed: {err})"
        ) from err
    return "torchao"


# ---- the layer and the variant ------------------------------------------------------------------------
class QLoRALinear(LoRALinear):
    """LoRA on a quantized base. merge() cannot fold the update into 4-bit codes without requantizing (lossy), so
    it dequantizes once: the merged layer computes x (W_deq + s B A)^T + b in full precision, exactly what the
    unmerged layer computes with compute_dtype=fp32 (to bf16 rounding with bf16), at full-precision memory for that layer; unmerge() drops it and the quantized
    weight, never modified, is back in use."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float):
        super().__init__(base, r, scaling, dropout)
        self.merged_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.merged_weight.to(x.dtype), self.base.bias)
        return super().forward(x)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            if not hasattr(self.base, "dequantized_weight"):
                raise NotImplementedError(f"merge() of a {type(self.base).__name__} base is not supported; "
                                          "merge on a full-precision copy of the base model instead")
            self.merged_weight = self.base.dequantized_weight(torch.float32) + self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.merged_weight = None
            self.merged = False


@register("qlora")
class QLoRA(LoRA):
    """LoRA (LoRA's adapter config; the QLoRA paper's is recipe=qlora_paper) on an NF4/int8 base.

    `prepare()` reports the encoder's linear-weight bytes before and after quantization, and the compute dtype.
    """

    peft_supported = False

    def validate(self) -> None:
        super().validate()
        quant = self.option("quant")
        require(quant in QUANT_TYPES, "variant.quant", quant, f"one of {QUANT_TYPES}")
        require(self.option("backend") in BACKENDS, "variant.backend", self.option("backend"), f"one of {BACKENDS}")
        require(isinstance(self.option("double_quant"), bool), "variant.double_quant", self.option("double_quant"),
                "true or false")
        for key in ("block_size", "scaler_block_size"):
            value = self.option(key)
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0, f"variant.{key}", value,
                    "a positive integer")
        require(self.option("compute_dtype", "auto") in ("auto", *COMPUTE_DTYPES), "variant.compute_dtype",
                self.option("compute_dtype"), "auto (bf16 where the device has it, else fp32), bf16 or fp32")
        backend = resolve_backend(self.option("backend"))  # here, so that a missing backend fails before loading
        if backend == "torchao" and quant == "nf4" and not self.option("double_quant"):
            raise ConfigError("variant.double_quant=false: torchao's NF4 always double-quantizes its scales; "
                              "use variant.double_quant=true, or variant.backend=bitsandbytes on CUDA")

    def prepare(self, model: nn.Module, head: list[str], device: torch.device | None = None) -> Prepared:
        """Quantize every frozen linear layer of the encoder, then put LoRA on the targets (LoRA's prepare). The
        facts: the encoder's linear-weight bytes before and after, the backend and the compute dtype."""
        facts = self.quantize_base(model, head, device)
        prepared = super().prepare(model, head, device)
        return Prepared(prepared.targeted, {**prepared.facts, **facts})

    def quantize_base(self, model: nn.Module, head: list[str], device: torch.device | None) -> dict[str, Any]:
        """Replace the encoder's linear layers (not the head's, not adapters) by quantized ones; what was done."""
        backend = resolve_backend(self.option("backend"))
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        compute_dtype = resolve_compute_dtype(self.option("compute_dtype", "auto"), device)
        linears = [(name, module) for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and not is_under(name, head) and not isinstance(module, AdapterLinear)]
        before = sum(weight_bytes(module.weight) for _, module in linears)
        dtype = COMPUTE_DTYPES[compute_dtype]
        replace_modules(model, linears, lambda name, linear: self.quantize(linear, backend, dtype))
        # bitsandbytes quantizes when the model moves to CUDA, after this point: its size is not known yet.
        after = (sum(weight_bytes(model.get_submodule(name).weight) for name, _ in linears)
                 if backend == "torchao" else None)
        return {"quant": self.option("quant"), "quant_backend": backend, "double_quant": self.option("double_quant"),
                "quantized_linear_layers": len(linears), "base_weight_bytes_before": before,
                "base_weight_bytes_after": after, "compute_dtype": compute_dtype}

    def quantize(self, linear: nn.Linear, backend: str, dtype: torch.dtype) -> nn.Linear:
        if backend == "bitsandbytes":
            return bitsandbytes_quantized_linear(linear, self.option("quant"), self.option("double_quant"), dtype)
        return TorchaoQuantizedLinear(linear, self.option("quant"), self.option("block_size"),
                                      self.option("scaler_block_size"), dtype)

    def make_layer(self, name: str, base: nn.Linear) -> QLoRALinear:
        return QLoRALinear(base, self.option("r"), self.scaling(), self.option("dropout", 0.0))
