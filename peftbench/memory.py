"""Exact accounting of live tensor storage, with a breakdown at the peak.

``TensorMemoryTracker`` is a ``TorchDispatchMode``. Every ATen operator that runs while it is
active (the forward, the backward, also on autograd's device threads, which inherit the mode,
and the optimizer) shows it its inputs and outputs; the tracker adds each storage it has not
seen yet once, by its storage (views and in-place results share their base's storage, so they
add nothing; an output whose storage grew, ``resize_`` or an ``out=`` op, adds the growth).
A storage is subtracted the moment it is freed, by a weak reference whose callback fires when
the C++ storage dies (storages keep their Python object alive as long as they live), whether
or not the mode is active at that moment.

The figure is the bytes of live tensor storages on one device type. Not in it: allocator
rounding and caching (CUDA: ``max_memory_allocated`` rounds small-pool blocks up to 512 bytes
and may leave up to about 1 MiB unsplit in a large-pool block, see docs/METHODOLOGY.md;
``max_memory_reserved`` adds the cache), memory a kernel allocates internally without a tensor
(CPU matmul packing buffers, cuBLAS workspaces), and Python objects. A tensor created while
the tracker is not active is counted from the moment it is passed to ``track`` or used by an
operator under the tracker; model weights, buffers, gradients and optimizer state are counted
from the start. On CPU the same work gives the same peak to the byte. A traceable wrapper
subclass (a quantized weight, ``peftbench.quantize``) owns no storage: the storages of its inner
tensors are counted, each once, and take the role of the parameter that holds them.

Breakdown: the storages live at the peak are split into weights (parameters and buffers),
gradients (storages that autograd stores in a parameter's ``.grad``, recorded by a
post-accumulate-grad hook, so a gradient that has just been computed and is about to be
stored counts as a gradient), optimizer state, and activations (everything else: tensors
saved for backward, temporaries, the input batch). Roles belong to storages, identified by a
serial number that is never reused, so the split can be made after the peak is long gone.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

if TYPE_CHECKING:
    from torch.utils._python_dispatch import TraceableWrapperSubclass

CATEGORIES = ("weights", "gradients", "optimizer", "activations")
_OPEN: weakref.WeakSet = weakref.WeakSet()  # trackers not closed yet


def storage_resized(t: torch.Tensor) -> None:
    """Tell every open tracker that ``t``'s storage was resized outside any operator
    (``untyped_storage().resize_``: FSDP frees an unsharded parameter's storage this way after
    use and grows it again before the next all-gather); no operator shows it to the tracker."""
    for tracker in list(_OPEN):
        tracker._see(t)


def plain_tensors(t: torch.Tensor | TraceableWrapperSubclass) -> Iterator[torch.Tensor]:
    """The tensors that hold ``t``'s bytes: ``t`` itself, or for a traceable wrapper subclass (a
    quantized weight: torchao's ``NF4Tensor``, ``Int8Tensor``) its inner tensors, recursively."""
    if is_traceable_wrapper_subclass(t):
        for name in t.__tensor_flatten__()[0]:
            yield from plain_tensors(getattr(t, name))
    else:
        yield t


class TensorMemoryTracker(TorchDispatchMode):
    """Live tensor bytes on ``device`` (a ``torch.device``, or its type), peak and breakdown.

    model / optimizer: what the breakdown classifies as weights, gradients and optimizer state;
    their tensors are counted from the start, as are ``extra`` tensors (an input batch, say).
    Enter it (``with tracker:``) around the work to measure, as often as needed; the peak runs
    across all of them until ``reset_peak``. Call ``close`` when done (removes hooks).
    """

    def __init__(
        self,
        model: Optional[torch.nn.Module] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        device: Any = "cpu",
        extra: Iterable[torch.Tensor] = (),
    ):
        super().__init__()
        self.device_type = torch.device(device).type if not isinstance(device, torch.device) else device.type
        self.model = model
        self.optimizer = optimizer
        # storage key (address of the C++ storage, unique while it lives) -> [serial, bytes, weakref]
        self.live: dict[int, list] = {}
        self.roles: dict[int, str] = {}  # serial -> weights | gradients | optimizer
        self.current = 0
        self.peak = 0
        self._serials = itertools.count()
        self._peak_items: list[tuple[int, int]] = []  # (serial, bytes) live at the peak
        self._peak_pending = False  # a new peak whose live set is not yet copied
        self._hooks: list[Any] = []
        self._closed = False
        self._final: dict[str, int] = {}
        self._mark_owned()
        for t in extra:
            self._see(t)
        if model is not None:
            for p in model.parameters():
                if p.requires_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
        self.reset_peak()
        _OPEN.add(self)

    # ----------------------------------------------------------------- bookkeeping
    def _see(self, t: Any) -> Optional[int]:
        """Count ``t``'s storage if it is new (or grew); returns its serial, None if not counted
        (a wrapper subclass has no storage of its own: its inner tensors are counted, ``_mark``)."""
        if is_traceable_wrapper_subclass(t):
            for inner in plain_tensors(t):
                self._see(inner)
            return None
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type or t.layout != torch.strided:
            return None
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without storage
            return None
        key = storage._cdata
        entry = self.live.get(key)
        n = storage.nbytes()
        if entry is None:
            ref = weakref.ref(storage, partial(self._on_free, key))
            entry = [next(self._serials), n, ref]
            self.live[key] = entry
            self._grow(n)
        elif entry[1] != n:  # resized in place
            if n < entry[1]:
                self._copy_peak_if_pending()
            self.current -= entry[1]
            entry[1] = n
            self._grow(n)
        return entry[0]

    def _grow(self, n: int) -> None:
        self.current += n
        if self.current > self.peak:
            self.peak = self.current
            self._peak_pending = True

    def _copy_peak_if_pending(self) -> None:
        """Remember the live set of the last peak before anything in it can be freed."""
        if self._peak_pending:
            self._peak_items = [(serial, n) for serial, n, _ in self.live.values()]
            self._peak_pending = False

    def _on_free(self, key: int, ref: weakref.ref) -> None:
        entry = self.live.get(key)
        if self._closed or entry is None or entry[2] is not ref:
            return
        self._copy_peak_if_pending()
        del self.live[key]
        self.current -= entry[1]

    def _mark(self, t: Optional[torch.Tensor], role: str) -> None:
        for plain in plain_tensors(t) if t is not None else ():
            serial = self._see(plain)
            if serial is not None and self.roles.get(serial) != "weights":
                self.roles[serial] = role

    def _on_grad(self, p: torch.Tensor) -> None:
        self._mark(p.grad, "gradients")

    def _mark_owned(self) -> None:
        """Give the model's and optimizer's live tensors their roles (counting them if new)."""
        if self.model is not None:
            for t in itertools.chain(self.model.parameters(), self.model.buffers()):
                self._mark(t, "weights")
            for p in self.model.parameters():
                self._mark(p.grad, "gradients")
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                for v in state.values():
                    if isinstance(v, torch.Tensor):
                        self._mark(v, "optimizer")

    # ------------------------------------------------------------------ public
    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors made while the tracker was not active (a new input batch, say)."""
        for t in tensors:
            self._see(t)

    def reset_peak(self) -> None:
        """Start a new phase: the peak becomes the bytes live now."""
        self.peak = self.current
        self._peak_pending = True
        self._copy_peak_if_pending()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):  # inputs made while the tracker was not active
            if isinstance(t, torch.Tensor):
                self._see(t)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t)
        return out

    def breakdown(self) -> dict[str, int]:
        """Bytes of the peak's live storages per category; they add up to ``peak``."""
        if self._closed:
            return dict(self._final)
        self._mark_owned()
        self._copy_peak_if_pending()
        out = dict.fromkeys(CATEGORIES, 0)
        for serial, n in self._peak_items:
            out[self.roles.get(serial, "activations")] += n
        return out

    def summary(self, prefix: str = "") -> dict[str, int]:
        """``<prefix>peak_memory_bytes`` and ``<prefix>memory_<category>_bytes`` (they add up)."""
        out = {f"{prefix}peak_memory_bytes": self.peak}
        out.update({f"{prefix}memory_{c}_bytes": n for c, n in self.breakdown().items()})
        return out

    def close(self) -> None:
        """Stop following storages and remove the gradient hooks; the figures stay readable."""
        if self._closed:
            return
        self._final = self.breakdown()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._closed = True
        _OPEN.discard(self)
        self.live.clear()
