"""Measure the peak bytes of tensor storage a piece of code keeps alive, on any device.

CPU has no allocator statistics (and RSS moves with the allocator's caching and the interpreter),
so `LiveStorage` counts the storages themselves: every tensor an operator returns is registered by
its storage, a weak reference drops it when the storage dies, and after each operator the live
total is compared with the peak. Storages are summed at their current size, so FSDP2's
`storage.resize_(0)` of resharded parameters counts as a free. Tensors that exist before the
measured code (parameters, optimizer state, the batch) are registered with `track`.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveStorage(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, weakref.ref] = {}
        self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        if hasattr(tensor, "to_local"):  # a DTensor: this rank's shard
            tensor = tensor.to_local()
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self._live:
            self._live[key] = weakref.ref(storage)
            weakref.finalize(storage, self._live.pop, key, None)

    @property
    def current(self) -> int:
        return sum(s.nbytes() for s in (ref() for ref in list(self._live.values())) if s is not None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self.track(tensor)
        self.peak = max(self.peak, self.current)
        return out


def measure_peak(step, *preexisting: torch.Tensor) -> int:
    """Peak live storage bytes while `step()` runs, counting `preexisting` tensors from the start."""
    tracker = LiveStorage()
    for tensor in preexisting:
        tracker.track(tensor)
    tracker.peak = tracker.current
    with tracker:
        step()
    return tracker.peak
