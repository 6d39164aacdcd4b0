"""The training-loop cost levers: precision, gradient checkpointing, gradient accumulation.

Each lever must leave the mathematics alone where it promises to (checkpointing: the same
gradients; accumulation: the gradient of the whole step's batch) and change the cost the way
it says (bf16 halves every stored byte; checkpointing keeps fewer activations, and its
recomputed forward is counted apart from the model FLOPs). Bad values are one line, exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import methods
from peftbench import app, cli, models, run
from peftbench.config import Levers
from peftbench.measure import flop_counter
from peftbench.train import loss_shares, train

from conftest import TINY_RUN, compose_config

METHODS = sorted(methods.REGISTRY)


def setup(*overrides: str):
    cfg = compose_config(*TINY_RUN, "results_dir=/nonexistent", *overrides)
    return cfg, run.setup(cfg, {"metrics": {}})


def batch(vocab: int, n: int = 4, length: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens, right padding of different lengths, loss masked on the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):
        mask[i, length - 3 * i :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def grads(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**b).loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_gradients_with_checkpointing_equal_those_without(method, model_name):
    """Every method (its modules live inside the checkpointed layers, or, for prefix and prompt
    tuning, feed them) gets the same gradients when activations are recomputed in backward."""
    cfg, s = setup(f"method={method}", f"model={model_name}")
    model = s.model
    model.train()
    b = batch(len(s.tokenizer))
    torch.manual_seed(0)
    with flop_counter() as counted:
        plain = grads(model, b)
    models.set_gradient_checkpointing(model, True)
    torch.manual_seed(0)
    with flop_counter() as counted_again:
        recomputed = grads(model, b)
    assert plain.keys() == recomputed.keys() and plain
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    # the layers' forward really ran again in backward
    assert counted_again.get_total_flops() > counted.get_total_flops()
    models.set_gradient_checkpointing(model, False)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_loss_shares_weight_micro_batches_by_predicted_tokens_or_examples():
    b = batch(50)  # rows have 23, 20, 17, 14 predicted tokens (labels shifted by one)
    halves = [{k: v[:2] for k, v in b.items()}, {k: v[2:] for k, v in b.items()}]
    assert loss_shares(halves) == pytest.approx([43 / 74, 31 / 74])
    cls = [{"labels": torch.tensor([0, 1, 1])}, {"labels": torch.tensor([1])}]
    assert loss_shares(cls) == [0.75, 0.25]


def levers(**kw) -> Levers:
    """The loop's levers at learning rate 1e-3, one rank, a batch of 8 (unused by the loop)."""
    base = dict(
        warmup_steps=0,
        grad_clip=1.0,
        weight_decay=0.0,
        grad_accum=1,
        precision="fp32",
        gradient_checkpointing=False,
        lr=1e-3,
        batch_size=8,
        world_size=1,
    )
    return Levers(**{**base, **kw})


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps a copy of every gradient it steps with (one list per step)."""

    seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        RecordingAdamW.seen.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_accumulating_micro_batches_equals_training_on_the_whole_batch(method, monkeypatch):
    """Four micro-batches of 2 per step give every optimizer step the gradient of one batch of
    8, and so the same loss curve: the micro-batches' losses are weighted by their predicted
    tokens, which differ here (padding), so a plain mean of the four losses would not match."""
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    steps = 4
    curves, grads_per_run = [], []
    for accum in (1, 4):
        cfg, s = setup(f"method={method}")
        whole = [batch(len(s.tokenizer), n=8, seed=i) for i in range(steps)]
        if accum == 1:
            feed = iter(whole)
        else:
            feed = iter([{k: v[j : j + 2] for k, v in b.items()} for b in whole for j in range(0, 8, 2)])
        RecordingAdamW.seen = []
        out = train(s.model, feed, steps, levers(grad_accum=accum), 0, 1, torch.device("cpu"))
        curves.append(out["train_losses"])
        grads_per_run.append(RecordingAdamW.seen)
    assert curves[1] == pytest.approx(curves[0], rel=1e-5)
    assert len(grads_per_run[0]) == len(grads_per_run[1]) == steps
    for whole_step, accumulated_step in zip(*grads_per_run):
        for g_whole, g_acc in zip(whole_step, accumulated_step):
            torch.testing.assert_close(g_acc, g_whole, rtol=1e-4, atol=1e-6)


def test_fp16_mixed_scales_the_loss_and_unscales_before_clipping():
    """The fp16-mixed path (CUDA in a run) exercised on CPU, where autocast and the scaler also
    exist: it trains, and reports the loss scale it ended with."""
    cfg, s = setup("method=lora")
    feed = iter([batch(len(s.tokenizer), seed=i) for i in range(3)])
    out = train(s.model, feed, 3, levers(precision="fp16-mixed"), 0, 1, torch.device("cpu"))
    assert all(torch.isfinite(torch.tensor(out["train_losses"])))
    assert out["metrics"]["train_loss_scale_final"] == 65536.0  # no overflow in 3 steps


def record(folder: Path) -> dict:
    (path,) = folder.glob("*.json")
    return json.loads(path.read_text())


def runs(tmp_path: Path, *levers: str, method: str = "lora") -> dict[str, dict]:
    out = {}
    for lever in ("fp32", *levers):
        folder = tmp_path / lever.replace("=", "-").replace(" ", "-")
        extra = [] if lever == "fp32" else lever.split()
        args = [*TINY_RUN, f"method={method}", "train.steps=4", *extra, f"results_dir={folder}"]
        assert cli.main(args) == app.EXIT_OK
        out[lever] = record(folder)
    return out


def test_pure_bf16_halves_the_weights_and_the_optimizer_moments(tmp_path):
    recs = runs(tmp_path, "train.precision=bf16", method="full")
    f, h = recs["fp32"]["metrics"], recs["train.precision=bf16"]["metrics"]
    assert h["memory_weights_bytes"] * 2 == f["memory_weights_bytes"]
    # AdamW: two moments per trained scalar in the weights' dtype, plus one float32 step count
    # per trained tensor, whatever the dtype
    n = f["trainable_params"]
    tensors = (f["memory_optimizer_bytes"] - 2 * 4 * n) / 4
    assert tensors == int(tensors) > 0
    assert h["memory_optimizer_bytes"] == 2 * 2 * n + 4 * tensors
    assert h["total_params"] == f["total_params"]
    assert h["train_flops_per_step"] == f["train_flops_per_step"]


def test_bf16_mixed_keeps_fp32_master_weights_and_tracks_fp32_closely(tmp_path):
    recs = runs(tmp_path, "train.precision=bf16-mixed")
    f, m = recs["fp32"], recs["train.precision=bf16-mixed"]
    for key in ("memory_weights_bytes", "memory_optimizer_bytes", "train_flops_per_step"):
        assert m["metrics"][key] == f["metrics"][key], key
    assert m["train_losses"] == pytest.approx(f["train_losses"], rel=2e-2)
    assert m["train_losses"] != f["train_losses"]  # bfloat16 products: not bit-identical


def test_checkpointing_counts_recomputation_apart_and_keeps_fewer_activations(tmp_path):
    recs = runs(tmp_path, "train.gradient_checkpointing=true")
    f, c = recs["fp32"], recs["train.gradient_checkpointing=true"]
    fm, cm = f["metrics"], c["metrics"]
    assert cm["train_model_flops_per_token"] == fm["train_flops_per_token"]  # the model's FLOPs
    assert cm["train_flops_per_token"] > fm["train_flops_per_token"]  # plus the forward again
    assert "train_model_flops_per_token" not in fm
    assert cm["memory_activations_bytes"] < fm["memory_activations_bytes"]
    assert cm["memory_weights_bytes"] == fm["memory_weights_bytes"]
    assert c["train_losses"] == pytest.approx(f["train_losses"], rel=1e-5)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train.precision=fp64"], "train.precision=fp64: allowed: fp32, bf16-mixed, bf16, fp16-mixed"),
        (
            ["train.precision=fp16-mixed", "device=cpu"],
            "train.precision=fp16-mixed: needs a CUDA device (the run's device is cpu); "
            "allowed here: fp32, bf16-mixed, bf16",
        ),
        (
            ["train.precision=bf16-mixed", "model.dtype=bfloat16"],
            "model.dtype=bfloat16: train.precision=bf16-mixed keeps float32 master weights; "
            "allowed: model.dtype=float32 (or train.precision=bf16 for bfloat16 weights)",
        ),
        (["train.grad_accum=0"], "train.grad_accum=0: must be an integer >= 1"),
    ],
)
def test_lever_config_errors_are_one_line_exit_2_and_nothing_written(args, expected, tmp_path, capsys):
    assert cli.main([*TINY_RUN, *args, f"results_dir={tmp_path}"]) == app.EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"peftbench: error: {expected}"]
    assert not list(tmp_path.rglob("*"))


def test_the_report_sets_each_lever_beside_the_same_method_in_fp32(tmp_path):
    """Ratios come from the run with no lever pulled and the same effective batch: accumulation
    (2 micro-batches of 1) is set against the batch of 2, checkpointing against fp32."""
    from peftbench import report

    recs = runs(tmp_path, "train.gradient_checkpointing=true", "train.batch_size=1 train.grad_accum=2")
    text = report.build([str(p) for p in tmp_path.iterdir()], tmp_path / "report").read_text()
    table = text[text.index("### What each lever buys") :].split("\n\n")[2].splitlines()
    cells = {row.split(" | ")[1]: row.split(" | ") for row in table[2:]}
    assert set(cells) == {"fp32", "checkpointing", "accumulation 2 x 1"}
    f = recs["fp32"]["metrics"]
    for lever, rec in (
        ("checkpointing", "train.gradient_checkpointing=true"),
        ("accumulation 2 x 1", "train.batch_size=1 train.grad_accum=2"),
    ):
        m = recs[rec]["metrics"]
        assert cells[lever][3] == f"{m['peak_memory_bytes'] / f['peak_memory_bytes']:.2f}"
        assert cells[lever][9].rstrip(" |") == f"{m['train_tokens_per_s'] / f['train_tokens_per_s']:.2f}"
