"""Bottleneck adapters (``method=adapter``): closed-form counts, identity at initialisation,
only adapter weights train, meta-device apply, config errors, end to end through the harness."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import methods
from methods.adapter import INSERTION_POINTS, AdapterConfig, AdapterLayer
from peftbench.errors import ConfigError

from conftest import REPO

D, LAYERS, VOCAB = 48, 2, 97
INSERTIONS = {"houlsby": 2, "pfeiffer": 1}


def tiny_config(arch: str):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if arch == "llama":
        return LlamaConfig(
            hidden_size=D,
            intermediate_size=80,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=64,
        )
    if arch == "gpt2":
        return GPT2Config(
            n_embd=D, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    return BertConfig(
        hidden_size=D,
        intermediate_size=80,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=2,
    )


def tiny_model(arch: str, meta: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if arch == "bert" else AutoModelForCausalLM
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return auto.from_config(tiny_config(arch), dtype=dtype)
    return auto.from_config(tiny_config(arch), dtype=dtype).eval()


def closed_form(variant: str, m: int, d: int = D, layers: int = LAYERS) -> int:
    return layers * INSERTIONS[variant] * (2 * d * m + m + d)


def batch(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # one padded example
    labels = torch.tensor([0, 1]) if arch == "bert" else ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def apply(model: nn.Module, **kw):
    method = methods.build(AdapterConfig(**kw))
    torch.manual_seed(1)
    return method, method.apply(model)


ARCHS = ("llama", "gpt2", "bert")
SIZES = ({"bottleneck": 5}, {"reduction_factor": 8})  # m = 5, m = 48 // 8 = 6


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", ("houlsby", "pfeiffer"))
@pytest.mark.parametrize("size", SIZES)
def test_trainable_count_is_closed_form(arch, variant, size):
    m = size.get("bottleneck") or D // size["reduction_factor"]
    method, model = apply(tiny_model(arch), variant=variant, **size)
    assert methods.trainable_parameters(model) == closed_form(variant, m)
    assert sum(p.numel() for n, p in model.named_parameters() if n in method.adapter_names(model)) == closed_form(
        variant, m
    )
    info = method.describe(model)
    assert (info["bottleneck"], info["hidden_size"], info["num_insertions"]) == (m, D, LAYERS * INSERTIONS[variant])
    # meta device: same structure, same count, no weights
    method_meta, meta = apply(tiny_model(arch, meta=True), variant=variant, **size)
    assert methods.trainable_parameters(meta) == closed_form(variant, m)
    assert all(p.device.type == "meta" for p in meta.parameters())


def test_insertion_paths_per_architecture():
    expected = {
        "llama": (["model.layers.{}.self_attn.o_proj"], ["model.layers.{}.mlp.down_proj"]),
        "gpt2": (["transformer.h.{}.attn.c_proj"], ["transformer.h.{}.mlp.c_proj"]),
        # the feed-forward pattern must not also take attention.output.dense
        "bert": (["bert.encoder.layer.{}.attention.output.dense"], ["bert.encoder.layer.{}.output.dense"]),
    }
    for arch, (attn, ffn) in expected.items():
        method, model = apply(tiny_model(arch, meta=True))
        paths = method.describe(model)["insertion_paths"]
        assert paths["attn"] == [p.format(i) for i in range(LAYERS) for p in attn]
        assert paths["ffn"] == [p.format(i) for i in range(LAYERS) for p in ffn]
        for name in paths["attn"] + paths["ffn"]:
            assert isinstance(model.get_submodule(name), AdapterLayer)


@pytest.mark.parametrize("model_type", sorted(INSERTION_POINTS))
def test_every_table_entry_finds_two_insertions_per_layer(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    encoder = model_type in ("bert", "roberta", "xlm-roberta", "electra", "distilbert")
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=VOCAB)
    if model_type == "distilbert":
        kw = dict(dim=32, hidden_dim=64, n_layers=3, n_heads=4, vocab_size=VOCAB)
    elif model_type == "gpt2":
        kw = dict(n_embd=32, n_layer=3, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    elif model_type == "opt":
        kw = dict(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            vocab_size=VOCAB,
            word_embed_proj_dim=32,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        )
    elif not encoder:
        kw.update(num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    config = AutoConfig.for_model(model_type, **kw)
    with torch.device("meta"):
        model = (AutoModelForSequenceClassification if encoder else AutoModelForCausalLM).from_config(config)
    method, model = apply(model, bottleneck=4)
    assert len(method.insertions["attn"]) == len(method.insertions["ffn"]) == 3
    assert methods.trainable_parameters(model) == closed_form("houlsby", 4, d=32, layers=3)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("activation", ("relu", "gelu", "silu", "tanh"))
def test_identity_at_initialisation(arch, activation):
    model = tiny_model(arch)
    inputs = batch(arch)
    with torch.no_grad():
        before = model(**inputs).logits
        apply(model, bottleneck=8, activation=activation)
        after = model(**inputs).logits
    assert torch.equal(before, after)
    # the down-projection is live (random), only the zero up-projection hides it
    down = [layer.adapter.down.weight for layer in model.modules() if isinstance(layer, AdapterLayer)]
    assert all(w.abs().sum() > 0 for w in down)


def test_init_is_deterministic_under_the_global_seed():
    _, a = apply(tiny_model("llama"))
    _, b = apply(tiny_model("llama"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", ARCHS)
def test_only_adapter_parameters_change(arch):
    method, model = apply(tiny_model(arch), bottleneck=6)
    names = method.adapter_names(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in range(4):
        loss = model(**batch(arch, seed=step % 2)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    for n, p in model.named_parameters():
        if n in names:
            assert not torch.equal(p, start[n]), f"adapter parameter {n} did not train"
        else:
            assert torch.equal(p, start[n]), f"base parameter {n} changed"
    assert {n.split(".adapter.")[1] for n in names} == {"down.weight", "down.bias", "up.weight", "up.bias"}


def test_adapter_follows_base_dtype_and_runs():
    method, model = apply(tiny_model("llama", dtype=torch.bfloat16))
    adapters = [p for n, p in model.named_parameters() if n in method.adapter_names(model)]
    assert adapters and all(p.dtype == torch.bfloat16 for p in adapters)
    assert torch.isfinite(model(**batch("llama")).loss)
    assert method.merge(model) is False and method.unmerge(model) is False


class Toy(nn.Module):
    """A two-block model of an architecture the table does not know."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="toy")
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"mix": nn.Linear(16, 16), "out": nn.Linear(16, 16)}) for _ in range(2)
        )

    def forward(self, x):
        for b in self.blocks:
            x = b["out"](b["mix"](x))
        return x


def test_unknown_architecture_needs_module_patterns():
    with pytest.raises(ConfigError, match=r"'toy'.*method\.attn_modules=\[\.\.\.\] and method\.ffn_modules"):
        apply(Toy())
    with pytest.raises(ConfigError, match=r"method\.ffn_modules=\[\.\.\.\]"):
        apply(Toy(), variant="pfeiffer")
    method, model = apply(Toy(), attn_modules=["mix"], ffn_modules=[r"blocks\.\d+\.out"], bottleneck=3)
    assert methods.trainable_parameters(model) == 2 * 2 * (2 * 16 * 3 + 3 + 16)
    assert method.describe(model)["insertion_modules"] == ["mix", "out"]


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"variant": "nope"}, "method.variant=nope"),
        ({"reduction_factor": 0}, "method.reduction_factor=0"),
        ({"bottleneck": 0}, "method.bottleneck=0"),
        ({"activation": "softmax"}, "method.activation=softmax"),
        ({"attn_modules": []}, "method.attn_modules=[]"),
        ({"ffn_modules": []}, "method.ffn_modules=[]"),
        ({"variant": "pfeiffer", "attn_modules": ["o_proj"]}, "method.attn_modules="),
        ({"lr": 0.0}, "method.lr=0.0"),
    ],
)
def test_bad_values_raise_config_error(kw, key):
    with pytest.raises(ConfigError) as e:
        methods.build(AdapterConfig(**kw))
    assert key in str(e.value) and "\n" not in str(e.value)


def test_bad_values_found_on_the_model():
    with pytest.raises(ConfigError, match=r"method\.reduction_factor=64: .*hidden size 48"):
        apply(tiny_model("llama", meta=True), reduction_factor=64)
    with pytest.raises(ConfigError, match=r"method\.ffn_modules=\['no_such'\]"):
        apply(tiny_model("llama", meta=True), ffn_modules=["no_such"])
    with pytest.raises(ConfigError, match=r"also matched by method\.attn_modules"):
        apply(tiny_model("llama", meta=True), attn_modules=["o_proj"], ffn_modules=["o_proj"])


def small_measure() -> list[str]:
    """Overrides that shrink the inference measurements to one small point, for the keys this
    harness version has (tiny_run does not shrink the latency grid or the decode run)."""
    from conftest import compose_config

    known = compose_config().measure
    wanted = {"latency_grid_batches": "[1]", "latency_grid_lengths": "[16]", "decode_tokens": "0"}
    return [f"measure.{k}={v}" for k, v in wanted.items() if k in known]


@pytest.mark.parametrize("variant", ("houlsby", "pfeiffer"))
def test_end_to_end_tiny_llama(tiny_run, variant):
    rec, path = tiny_run("method=adapter", f"method.variant={variant}", *small_measure())
    assert rec["status"] == "ok", rec.get("error")
    # conf/model/tiny-llama.yaml: hidden 256, 4 layers; m = 256 // 16
    assert rec["metrics"]["trainable_params"] == closed_form(variant, 16, d=256, layers=4)
    assert rec["method_config"]["bottleneck"] == 16 and rec["method_config"]["variant"] == variant
    assert "inference_latency_unmerged_ms" not in rec["metrics"]  # adapters cannot be merged


def test_cli_rejects_bad_variant_in_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "peftbench", "method=adapter", "method.variant=nope"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "method.variant=nope" in lines[0] and "houlsby" in lines[0]
