"""Tiny models of the three built-in families, for method tests: LLaMA (grouped-query
attention, nn.Linear), GPT-2 (fused Conv1D) and BERT (encoder, sequence classification). fp32,
eval mode, no dropout, seeded; eos/bos unset so that greedy generation never stops early."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 97
H, I, LAYERS = 32, 64, 2  # hidden, intermediate (GPT-2: 4 * H), layers
KV = 2 * (H // 4)  # LLaMA: 2 key/value heads of head_dim 8


def llama(meta: bool = False) -> nn.Module:
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    return build(LlamaForCausalLM, cfg, meta)


def gpt2(meta: bool = False) -> nn.Module:
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=H,
        n_layer=LAYERS,
        n_head=4,
        n_positions=64,
        bos_token_id=None,
        eos_token_id=None,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return build(GPT2LMHeadModel, cfg, meta)


def bert(meta: bool = False) -> nn.Module:
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return build(BertForSequenceClassification, cfg, meta)


def build(cls: type, cfg, meta: bool) -> nn.Module:
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return cls(cfg).eval()
    return cls(cfg).eval()


FAMILIES = {"llama": llama, "gpt2": gpt2, "bert": bert}
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}


def batch(family: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Three right-padded rows of 9 tokens (row 1 has 6 real ones), with labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100) if TASK[family] == "CAUSAL_LM" else torch.tensor([0, 2, 1])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def logits(model: nn.Module, b: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in b.items() if k != "labels"}).logits


def perturb(model: nn.Module, names: set[str], seed: int = 7, scale: float = 0.3) -> None:
    """Add seeded noise to the parameters in ``names`` (a method at init often equals the base
    model, which would hide most errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if n in names:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)
