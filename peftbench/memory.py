"""Exact accounting of live tensor storage, with a breakdown at the peak.

``TensorMemoryTracker`` is a ``TorchDispatchMode``: every ATen operator that runs while it is
active (forward, backward on the autograd thread, the optimizer) reports its outputs, and the
tracker adds each new storage's size once (views share a storage) and notices freed storages
through weak references. The figure is the bytes of live tensor storages on one device:
allocator rounding and caching (``torch.cuda.max_memory_reserved``), kernel workspaces and
Python objects are not in it. On CPU the same work gives the same peak to the byte.

At each new peak the tracker records which storages were live; they are classified into
weights (parameters and buffers), gradients (``.grad``), optimizer state, and everything else
(activations saved for backward, temporaries, the input batch) once the op that made the peak
has returned, so a gradient that autograd is about to store in ``.grad`` counts as a gradient.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = ("weights", "gradients", "optimizer", "activations")


def _key(t: torch.Tensor) -> tuple[int, Any]:
    s = t.untyped_storage()
    return s._cdata, s


class TensorMemoryTracker(TorchDispatchMode):
    """Live tensor bytes on ``device`` (a ``torch.device`` or its type), peak and breakdown.

    model / optimizer: what the breakdown classifies as weights, gradients and optimizer
    state. Tensors that exist before the tracker starts are counted when they belong to the
    model or the optimizer, or are passed in ``extra`` (an input batch, say).
    """

    def __init__(self, model: Optional[torch.nn.Module] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                 device: Any = "cpu", extra: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.device_type = torch.device(device).type
        self.model = model
        self.optimizer = optimizer
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0
        self.peak_breakdown: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self._peak_snapshot: Optional[dict[int, int]] = None
        for t in self._owned_tensors():
            self._add(t)
        for t in extra:
            self._add(t)
        self._new_peak()
        self._classify_pending()

    # ----------------------------------------------------------------- bookkeeping
    def _owned_tensors(self) -> list[torch.Tensor]:
        out = []
        if self.model is not None:
            out += list(self.model.parameters()) + list(self.model.buffers())
            out += [p.grad for p in self.model.parameters() if p.grad is not None]
        out += self._optimizer_tensors()
        return out

    def _optimizer_tensors(self) -> list[torch.Tensor]:
        if self.optimizer is None:
            return []
        return [v for state in self.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]

    def _add(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type or t.is_sparse:
            return
        key, storage = _key(t)
        if key not in self.live:
            n = storage.nbytes()
            self.live[key] = (StorageWeakRef(storage), n)
            self.current += n

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def _new_peak(self) -> None:
        self.peak = self.current
        self._peak_snapshot = {k: n for k, (_, n) in self.live.items()}

    def _classify_pending(self) -> None:
        """Split the last peak's storages into the four categories."""
        snap = self._peak_snapshot
        if snap is None:
            return
        self._peak_snapshot = None
        keys: dict[str, set[int]] = {"weights": set(), "gradients": set(), "optimizer": set()}
        if self.model is not None:
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                keys["weights"].add(t.untyped_storage()._cdata)
            for p in self.model.parameters():
                if p.grad is not None:
                    keys["gradients"].add(p.grad.untyped_storage()._cdata)
        for t in self._optimizer_tensors():
            keys["optimizer"].add(t.untyped_storage()._cdata)
        out = dict.fromkeys(CATEGORIES, 0)
        for k, n in snap.items():
            cat = next((c for c in ("weights", "gradients", "optimizer") if k in keys[c]), "activations")
            out[cat] += n
        self.peak_breakdown = out

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors made outside the tracker (a new input batch, say)."""
        self._sweep()
        for t in tensors:
            self._add(t)
        if self.current > self.peak:
            self._new_peak()

    def reset_peak(self) -> None:
        """Start a new phase: the peak becomes the bytes live now."""
        self._classify_pending()
        self._sweep()
        self._new_peak()
        self._classify_pending()

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._classify_pending()
        out = func(*args, **(kwargs or {}))
        new = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if new:
            self._sweep()
            for t in new:
                self._add(t)
            if self.current > self.peak:
                self._new_peak()
        return out

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        self._sweep()
        self._classify_pending()
        return result

    def summary(self) -> dict[str, int]:
        """Peak bytes and its breakdown (``memory_<category>_bytes``); they add up exactly."""
        self._classify_pending()
        out = {"peak_memory_bytes": self.peak}
        out.update({f"memory_{c}_bytes": self.peak_breakdown[c] for c in CATEGORIES})
        return out
