"""What a new sequence length costs on this GPU: the first forward+backward of masked attention and of a
roberta-base linear layer at each new length, against a repeat at the same length, per dtype (and, for attention,
per backend set).

Why: on an H200 (benchmarks/README.md, gpu_check), LoRA at roberta-base's shape with length-grouped bf16 batches paid
a one-off of 3-10 s in its first 40 steps that fp32 did not, and its steady step was faster than fp32's. Two
suspects, both paid once per new shape, and length-grouped batches bring a new length at almost every early step:
cuDNN's attention, which builds a graph for every new shape, and cuBLAS's first call (kernel choice and lazy
loading) for each new GEMM shape. This probe times both, so that a fix (padding lengths to a multiple of 8 on
CUDA, or leaving cuDNN's attention out) is chosen on numbers.

    python benchmarks/sdpa_first_call.py            # CUDA only; about a minute on an H200
"""
import contextlib
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BATCH, HEADS, HEAD_DIM = 32, 12, 64  # roberta-base's attention at the harness's batch size
WIDTH = HEADS * HEAD_DIM
NEW_LENGTHS = 24  # per row; each row of a dtype gets lengths no other row of it has seen (caches are per shape)
BACKEND_SETS = {
    "default": None,
    "cuDNN first": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH],
    "without cuDNN": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
}


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start)


def attention(length: int, dtype: torch.dtype) -> float:
    """Masked attention forward+backward at `length` (a quarter padding, as an encoder's padded batch), in ms."""
    q, k, v = (torch.randn(BATCH, HEADS, length, HEAD_DIM, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    keep = torch.ones(BATCH, length, dtype=torch.bool, device="cuda")
    keep[:, length * 3 // 4:] = False
    return timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :]).sum().backward())


def linear(length: int, dtype: torch.dtype) -> float:
    """A 768 x 768 linear layer's forward+backward over BATCH x `length` tokens, in ms."""
    x = torch.randn(BATCH * length, WIDTH, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(WIDTH, WIDTH, device="cuda", dtype=dtype, requires_grad=True)
    return timed(lambda: F.linear(x, w).sum().backward())


def row(op: str, dtype: torch.dtype, label: str, probe, lengths: list[int]) -> None:
    probe(8, dtype)  # the process's first call at this dtype is not the cost of a new length
    first = [probe(length, dtype) for length in lengths]
    repeat = [probe(length, dtype) for length in lengths]
    print(f"{op:<9} {str(dtype).removeprefix('torch.'):<9} {label:<14} {statistics.median(first):>13.2f} "
          f"{max(first):>8.1f} {sum(first):>8.0f} {statistics.median(repeat):>15.2f}")


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("sdpa_first_call.py measures CUDA kernels' first calls; no CUDA device here")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | cuDNN {torch.backends.cudnn.version()}")
    print(f"{NEW_LENGTHS} new lengths in 16..128 per row, batch {BATCH}; forward+backward ms")
    print(f"{'op':<9} {'dtype':<9} {'backends':<14} {'first: median':>13} {'max':>8} {'total':>8} {'repeat: median':>15}")
    for dtype in (torch.bfloat16, torch.float32):
        fresh = random.Random(0).sample(range(16, 129), NEW_LENGTHS * (1 + len(BACKEND_SETS)))
        chunks = [fresh[i:i + NEW_LENGTHS] for i in range(0, len(fresh), NEW_LENGTHS)]
        row("linear", dtype, "-", linear, chunks[0])
        for (label, backends), lengths in zip(BACKEND_SETS.items(), chunks[1:]):
            context = sdpa_kernel(backends, set_priority=True) if backends else contextlib.nullcontext()
            with context:
                row("attention", dtype, label, attention, lengths)


if __name__ == "__main__":
    main()
