"""What the methods know about each model architecture, in one place.

Keyed by the transformers ``model_type``. Module patterns follow ``methods.match_modules``: a
bare name matches a module's last name component (``q_proj``); a pattern with a dot or regex
characters is a regular expression over the full dotted name.

- ``ATTENTION_TARGETS``: the query and value projections (LoRA's and DoRA's ``attention`` preset).
- ``INSERTION_POINTS``: each layer's (attention output, feed-forward output) projection, where
  bottleneck adapters go.
- ``IA3_TARGETS``: (modules whose output is scaled, modules whose input is scaled) for (IA)^3.
- ``TASK_HEADS`` / ``HEAD_NAMES``: module names of task heads (a fresh classifier the harness
  trains whole) / of those and the output layers (which LoRA's ``all-linear`` leaves alone).
- ``LINEAR_TYPES``: the layer types that hold a linear weight, ``nn.Linear`` and GPT-2's
  ``Conv1D`` (which stores its weight transposed, (in, out)).
"""

from __future__ import annotations

from typing import Any, Optional, cast

import torch
from torch import nn

from methods import ConfigError

Conv1D: Optional[type[nn.Module]]
try:  # GPT-2's transposed linear layer
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D) if Conv1D is not None else (nn.Linear,)


def is_transposed(module: nn.Module) -> bool:
    """True for a layer that stores its weight as (in, out) (GPT-2's Conv1D)."""
    return not isinstance(module, nn.Linear)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear or a Conv1D."""
    w = cast(torch.Tensor, module.weight)
    return (w.shape[0], w.shape[1]) if is_transposed(module) else (w.shape[1], w.shape[0])


def model_type(model: nn.Module) -> Optional[str]:
    """The transformers ``model_type`` of ``model`` (or of the model a wrapper holds), or None."""
    return getattr(getattr(model, "config", None), "model_type", None)


# Task heads: a classification head that the harness creates fresh and every method trains
# whole (every linear layer inside it, e.g. RoBERTa's classifier.dense and classifier.out_proj).
TASK_HEADS = ("classifier", "score")
# Output layers and task heads: what LoRA's all-linear leaves alone.
HEAD_NAMES = ("lm_head", "embed_out", *TASK_HEADS)


def in_head(name: str) -> bool:
    """True if the dotted module or parameter ``name`` lies inside an output layer or head."""
    return any(part in HEAD_NAMES for part in name.split("."))


_QV = ["q_proj", "v_proj"]
ATTENTION_TARGETS: dict[str, list[str]] = {
    "llama": _QV,
    "mistral": _QV,
    "qwen2": _QV,
    "qwen3": _QV,
    "gemma": _QV,
    "gemma2": _QV,
    "opt": _QV,
    "gpt2": ["c_attn"],  # fused query, key and value
    "gpt_neox": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
}

# Anchored on the layer index so that BERT's feed-forward ``layer.N.output.dense`` cannot also
# match the attention's ``attention.output.dense``.
_LLAMA_LIKE = (r".*\.layers\.\d+\.self_attn\.o_proj", r".*\.layers\.\d+\.mlp\.down_proj")
_BERT_LIKE = (r".*\.layer\.\d+\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense")
INSERTION_POINTS: dict[str, tuple[str, str]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "gpt2": (r".*\.h\.\d+\.attn\.c_proj", r".*\.h\.\d+\.mlp\.c_proj"),
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "opt": (r".*\.layers\.\d+\.self_attn\.out_proj", r".*\.layers\.\d+\.fc2"),
    "gpt_neox": (r".*\.layers\.\d+\.attention\.dense", r".*\.layers\.\d+\.mlp\.dense_4h_to_h"),
    "distilbert": (r".*\.layer\.\d+\.attention\.out_lin", r".*\.layer\.\d+\.ffn\.lin2"),
}

# (IA)^3: keys and values are scaled on their output, the feed-forward intermediate on the input
# of the down projection. These are peft's defaults, so that runs compare like for like. For the
# BERT family peft's ``output.dense`` names both the feed-forward output and the attention output
# projection, so the attention context (the input of ``attention.output.dense``) is scaled too.
_LLAMA_IA3 = (["k_proj", "v_proj"], ["down_proj"])
_BERT_IA3 = (["key", "value"], [r".*\.output\.dense"])
IA3_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "llama": _LLAMA_IA3,
    "mistral": _LLAMA_IA3,
    "qwen2": _LLAMA_IA3,
    "qwen3": _LLAMA_IA3,
    "gemma": _LLAMA_IA3,
    "gemma2": _LLAMA_IA3,
    "gpt2": (["c_attn"], [r".*\.mlp\.c_proj"]),  # c_attn's output is query, key and value
    "bert": _BERT_IA3,
    "roberta": _BERT_IA3,
    "opt": (["k_proj", "v_proj"], ["fc2"]),
    "gpt_neox": (["query_key_value"], ["dense_4h_to_h"]),
}


def table_entry(table: dict[str, Any], model: nn.Module, what: str, fix: str) -> Any:
    """``table[model_type(model)]``, or a one-line ConfigError naming the model type, what is
    missing, how to set it by hand (``fix``) and the model types the table knows."""
    kind = model_type(model)
    if kind not in table:
        raise ConfigError(
            f"{what}: no preset for model_type {kind!r}; set {fix} (presets exist for {', '.join(sorted(table))})"
        )
    return table[kind]
