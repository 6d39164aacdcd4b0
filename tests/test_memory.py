"""The tensor-memory tracker against figures computed by hand, byte for byte.

Everything here is float32 (4 bytes per scalar) on CPU. A figure is the bytes of tensor
storages that are live at the same time, as seen at ATen operator boundaries.
"""

from __future__ import annotations

import torch
from torch import nn

from peftbench.memory import TensorMemoryTracker

F32 = 4


def test_one_adamw_step_peak_is_in_the_optimizer_and_matches_hand_count():
    torch.manual_seed(0)
    model = nn.Linear(64, 32, bias=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    x = torch.randn(1, 64)
    tracker = TensorMemoryTracker(model, opt, "cpu", extra=[x])
    with tracker:
        loss = model(x).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    summary = tracker.summary()
    tracker.close()

    w = 32 * 64 * F32  # weight (32, 64): 8,192
    x_bytes = 64 * F32  # input (1, 64): 256
    loss_bytes = F32  # the scalar loss, still referenced
    grad = w  # .grad of the weight
    adam = 2 * w + F32  # exp_avg, exp_avg_sq (like the weight) and the 0-d float32 step
    # AdamW's single-tensor update computes denom = (exp_avg_sq.sqrt() / c).add_(eps): at the
    # division both the sqrt temporary and the quotient are live, two weight-sized tensors.
    temporaries = 2 * w
    # Forward output (1, 32) and the backward's ones-like seed are freed long before.
    assert summary["peak_memory_bytes"] == w + x_bytes + loss_bytes + grad + adam + temporaries == 49_416
    assert summary["memory_weights_bytes"] == w
    assert summary["memory_gradients_bytes"] == grad
    assert summary["memory_optimizer_bytes"] == adam
    assert summary["memory_activations_bytes"] == temporaries + x_bytes + loss_bytes


def test_gradient_just_computed_at_the_peak_counts_as_gradient():
    """Peak inside backward, when the first layer's weight gradient has just been produced
    and autograd has not yet stored it in ``.grad``."""
    model = nn.Sequential(nn.Linear(64, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False))
    x = torch.randn(2, 64)
    tracker = TensorMemoryTracker(model, None, "cpu", extra=[x])
    with tracker:
        model(x).sum().backward()
    s = tracker.summary()
    tracker.close()

    w1, w2 = 8 * 64 * F32, 4 * 8 * F32  # 2,048 and 128
    x_bytes = 2 * 64 * F32  # 512
    loss, seed = F32, F32  # the scalar loss (held by the graph) and its ones-like grad
    grad_h = 2 * 8 * F32  # grad of the first layer's output after ReLU backward: 64
    # Order of backward: last layer's weight grad (stored), grad wrt ReLU output, ReLU backward
    # (grad_h; the ReLU's saved output and its incoming grad are then freed), then the first
    # layer's weight grad (2,048): the peak, since 2,048 > the freed 2 x (2, 8) tensors.
    assert s["peak_memory_bytes"] == w1 + w2 + x_bytes + loss + seed + w2 + grad_h + w1 == 4_936
    assert s["memory_weights_bytes"] == w1 + w2
    assert s["memory_gradients_bytes"] == w1 + w2
    assert s["memory_activations_bytes"] == x_bytes + loss + seed + grad_h


def test_views_and_inplace_ops_add_nothing_and_frees_are_seen_outside_the_mode():
    tracker = TensorMemoryTracker(device="cpu")
    with tracker:
        a = torch.zeros(1000)  # 4,000 bytes
        v = a[10:].view(-1, 10)  # view: same storage
        a.add_(1)
        v.mul_(2)
        b = a.clone()  # 4,000 more
        assert tracker.current == 8_000
    del a, v  # freed while the mode is not active
    assert tracker.current == 4_000
    with tracker:
        c = b * 2  # 4,000 more: the peak stays 8,000
    assert tracker.peak == 8_000 and tracker.current == 8_000
    del b, c
    tracker.close()


def test_tensors_made_outside_the_mode_count_from_first_use_and_resize_counts():
    tracker = TensorMemoryTracker(device="cpu")
    outside = torch.ones(250)  # 1,000 bytes, not yet seen
    assert tracker.current == 0
    with tracker:
        grown = torch.empty(0)
        outside.add_(1)  # seen as an op input
        assert tracker.current == 1_000
        grown.resize_(100)  # storage grows in place: 400 bytes
        assert tracker.current == 1_400
    tracker.close()


def test_same_work_gives_the_same_peak_to_the_byte():
    def once() -> dict[str, int]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tracker = TensorMemoryTracker(model, opt, "cpu")
        for _ in range(2):
            x = torch.randn(16, 32)
            tracker.track([x])
            with tracker:
                model(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        out = tracker.summary()
        tracker.close()
        return out

    first, second = once(), once()
    assert first == second
    assert sum(v for k, v in first.items() if k.startswith("memory_")) == first["peak_memory_bytes"]


def test_a_storage_resized_outside_any_operator_is_followed_when_announced():
    """FSDP frees an unsharded parameter with ``untyped_storage().resize_(0)`` and grows it again
    before the next all-gather; no operator shows that, so ``memory.storage_resized`` tells the
    open trackers, and the freed bytes stop counting (``ranks.follow_fsdp_storage``)."""
    from peftbench.memory import _OPEN, TensorMemoryTracker, storage_resized

    def memory_open() -> list:
        return list(_OPEN)

    tracker = TensorMemoryTracker()
    with tracker:
        t = torch.ones(1000)  # 4,000 bytes
    assert tracker.current == 4000
    t.untyped_storage().resize_(0)
    assert tracker.current == 4000  # unseen
    storage_resized(t)
    assert tracker.current == 0 and tracker.peak == 4000
    t.untyped_storage().resize_(4000)
    storage_resized(t)
    assert tracker.current == 4000
    tracker.close()
    t.untyped_storage().resize_(0)
    storage_resized(t)  # a closed tracker is no longer told: its figures stay as they were
    assert tracker.peak == 4000 and tracker not in memory_open()
