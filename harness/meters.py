"""Memory meters behind the row's memory columns: what autograd saves for backward (exact, device-independent),
the bytes of parameters, gradients and optimizer state, and the measured peak (CUDA allocator, or CPU peak RSS)."""

from __future__ import annotations

import resource
import sys

import torch


class SavedTensorMeter:
    """Bytes autograd keeps for backward: every saved tensor's storage counted once, parameters excluded.

    Counting storages, not tensors, is what makes it exact: query and value read the same input, and a
    view saved twice is one allocation. Device-independent, so it also explains GPU memory measured on CPU.
    """

    def __init__(self, model: torch.nn.Module):
        self.exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]
                        if t.device.type != "meta"}
        self.storages: dict[tuple[str, int], int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without one storage (e.g. NF4)
            return tensor
        pointer = storage.data_ptr()
        if pointer not in self.exclude and pointer != 0:
            self.storages[(str(tensor.device), pointer)] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(v for v in state.values() if torch.is_tensor(v)) for state in optimizer.state.values())


def reset_cpu_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux VmHWM) so that each run in a long-lived process (a sweep)
    measures its own peak; False where the platform cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def cpu_peak_rss_bytes() -> int:
    """Peak resident set size since the last reset (Linux VmHWM), else since the process started."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def memory_account(model, optimizer) -> dict[str, int]:
    """Exact bytes held for parameters, gradients and optimizer state after the first step."""
    params = [*model.parameters()]
    return {
        "param_bytes": tensor_bytes(params) + tensor_bytes(model.buffers()),
        "grad_bytes": tensor_bytes(p for p in params if p.requires_grad),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
    }


def peak_memory(device: torch.device) -> dict[str, int | None]:
    peaks = {"cpu_peak_rss_bytes": cpu_peak_rss_bytes(),
             "cuda_peak_allocated_bytes": None, "cuda_peak_reserved_bytes": None}
    if device.type == "cuda":
        peaks["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        peaks["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return peaks
