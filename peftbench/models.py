"""Base models: built from a transformers config with seeded random weights, or loaded from a
local directory (or a hub id where the user has internet).

The task decides the head: a causal-LM task gets ``AutoModelForCausalLM``, a classification
task ``AutoModelForSequenceClassification`` with a fresh, seeded head that every method trains.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, cast

import torch
from omegaconf import OmegaConf
from torch import nn

from methods import context_length  # noqa: F401 (re-exported for the harness)
from methods.arch import TASK_HEADS
from peftbench import weights
from peftbench.config import ModelConfig
from peftbench.errors import ConfigError

ENCODER_TYPES = ("bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2", "xlm-roberta")


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# Files that a saved tokenizer leaves in its folder (any one of them is enough).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def has_tokenizer(name_or_path: str) -> bool:
    """Whether a local checkpoint folder holds a tokenizer; a hub id is assumed to have one."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return True
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


def checkpoint(cfg: ModelConfig) -> Optional[str]:
    """What ``from_pretrained`` reads for this model (a folder or a hub id; a GGUF file is
    dequantized into a cache folder once), or None for a random-init model."""
    if cfg.name_or_path is None:
        return None
    return weights.resolve(cfg.name_or_path, getattr(cfg, "install", None))


def load_tokenizer(cfg: ModelConfig):
    """The pretrained model's own tokenizer; None for a random-init model or a local checkpoint
    saved without one (the task then fits a word-level tokenizer on its training text)."""
    path = checkpoint(cfg)
    if path is None or not has_tokenizer(path):
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"model.name_or_path={cfg.name_or_path}: cannot load its tokenizer: {' '.join(str(e).split())[:200]}"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def model_config(
    cfg: ModelConfig, kind: str, vocab_size: Optional[int], pad_token_id: Optional[int] = None, num_labels: int = 2
) -> Any:
    """The transformers config that both the real build and the meta-device build use, with
    every check a build makes, so that the dry run checks exactly what the run builds.

    vocab_size: tokens of the tokenizer in use (the word-level tokenizer's size when the model
    brings none; None when the model's own tokenizer is used, which fits its embedding).
    pad_token_id: the tokenizer's padding id (None in the dry run). num_labels: classes of a
    classification task (the dry run does not read the data, and passes 2).
    """
    from transformers import AutoConfig

    extra: dict[str, Any] = {"num_labels": num_labels} if kind == "classification" else {}
    if cfg.name_or_path is None:
        arch = (
            cast(dict[str, Any], OmegaConf.to_container(cfg.arch, resolve=True))
            if not isinstance(cfg.arch, dict)
            else dict(cfg.arch)
        )
        model_type = arch.pop("model_type", None)
        rows = arch.pop("vocab_size", vocab_size)  # a preset may fix the real vocabulary
        if model_type is None:
            raise ConfigError(
                "model.arch.model_type=null: a random-init model needs a transformers model_type "
                "(llama, gpt2, bert, ...)"
            )
        if rows is None:
            raise ConfigError("model.arch.vocab_size=null: a random-init model needs a vocabulary size")
        if vocab_size is not None and rows < vocab_size:
            raise ConfigError(
                f"model.arch.vocab_size={rows}: smaller than the tokenizer's {vocab_size} tokens; "
                f"allowed: >= {vocab_size}, or lower task.vocab_size"
            )
        try:
            config = AutoConfig.for_model(model_type, **arch, vocab_size=rows, pad_token_id=pad_token_id, **extra)
        except ValueError as e:  # an unknown model_type
            raise ConfigError(f"model.arch.model_type={model_type}: {str(e).splitlines()[0]}") from None
        except Exception as e:  # the config class's own validators (hidden size against heads, ...)
            reason = " ".join(str(e).split()).rsplit("Error: ", 1)[-1]
            given = ", ".join(f"{k}={v}" for k, v in sorted(arch.items()))
            raise ConfigError(
                f"model.arch ({given}): transformers refuses this {model_type} architecture: {reason}; "
                "allowed: an architecture its config class accepts"
            ) from None
    else:
        config = pretrained_config(cast(str, checkpoint(cfg)), cfg.name_or_path, **extra)  # name_or_path is set
        rows = getattr(config, "vocab_size", None)
        if vocab_size is not None and rows is not None and vocab_size > rows:
            raise ConfigError(
                f"model.name_or_path={cfg.name_or_path}: its embedding has {rows} rows but the tokenizer "
                f"has {vocab_size} tokens; allowed: save the model's tokenizer with it, or task.vocab_size<={rows}"
            )
    check_head(config, kind, cfg.name)
    return config


def tokens_in_use(cfg: ModelConfig, word_vocab_size: int) -> Optional[int]:
    """The tokenizer size a run will have, known before anything loads: None for a checkpoint
    with its own tokenizer, else the word-level tokenizer's ``word_vocab_size``."""
    if cfg.name_or_path is not None and has_tokenizer(cast(str, checkpoint(cfg))):
        return None
    return word_vocab_size


def auto_class(kind: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification


def build(cfg: ModelConfig, kind: str, vocab_size: int, pad_token_id: int, num_labels: int) -> nn.Module:
    """The base model for a task of ``kind``; random weights are seeded by ``cfg.init_seed``.

    vocab_size / pad_token_id come from the tokenizer in use; num_labels from the task.
    """
    config = model_config(cfg, kind, vocab_size, pad_token_id, num_labels)
    torch.manual_seed(cfg.init_seed)  # the random weights, or a freshly initialised head
    if cfg.name_or_path is None:
        model = auto_class(kind).from_config(config, dtype=torch_dtype(cfg.dtype))
        model.config.architectures = [type(model).__name__]  # from_config leaves it unset
        return model
    extra: dict[str, Any] = {"num_labels": num_labels} if kind == "classification" else {}
    loaded: Any = auto_class(kind).from_pretrained(
        checkpoint(cfg), dtype=torch_dtype(cfg.dtype), output_loading_info=True, **extra
    )
    model, info = loaded
    # every weight from the file: a classification head is new by design, a tied output embedding
    # is the input one; anything else transformers filled with random values is refused
    fresh = head_names(model) if kind == "classification" else set()
    missing = [k for k in weights.missing_weights(list(info.get("missing_keys", [])), model) if k not in fresh]
    weights.refuse_missing(str(cfg.name_or_path), missing, len(model.state_dict()))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


def pretrained_config(path: str, name_or_path: str, **kwargs: Any) -> Any:
    """The ``config.json`` of a local folder or hub id ``path`` (what ``name_or_path`` resolved
    to), or a one-line ``ConfigError`` naming ``name_or_path``."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"model.name_or_path={name_or_path}: cannot load its config.json "
            f"(a local folder, or a hub id with internet access): {' '.join(str(e).split())[:200]}"
        ) from None


def set_gradient_checkpointing(model: nn.Module, on: bool) -> None:
    """Switch transformers' gradient checkpointing of every layer of ``model`` (the outermost
    transformers model inside it, so a wrapper such as prefix tuning's works too). Non-reentrant
    (``torch.utils.checkpoint`` with ``use_reentrant=False``): gradients reach modules inside a
    layer even when the layer's input needs none (a frozen embedding under LoRA), and a layer's
    forward is recomputed in backward with the random state it first ran with."""
    from transformers import PreTrainedModel

    top = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if top is None or not top.supports_gradient_checkpointing:
        name = type(top or model).__name__
        raise ConfigError(f"train.gradient_checkpointing=true: {name} does not support it; allowed: false")
    if on:
        top.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # transformers also makes the input embeddings' output require grad, which reentrant
        # checkpointing needs and non-reentrant does not: it would only add backward work (the
        # gradient of the first layer's input) that the run without checkpointing does not do.
        if hasattr(top, "_require_grads_hook"):
            top.disable_input_require_grads()
        # Layers that checkpoint themselves (transformers' GradientCheckpointingLayer) drop the
        # KV cache unless they may keep it (``_can_checkpoint_with_cache``, which prefix tuning
        # sets on each layer's instance: its prefix cache is read-only in training). GPT-2's
        # model-level flag would drop the cache before the layers see it, so where the layers
        # may keep it, that flag is cleared and the layers alone checkpoint.
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in top.modules() if isinstance(m, GradientCheckpointingLayer)]
        if layers and all(vars(m).get("_can_checkpoint_with_cache") for m in layers):
            for m in top.modules():
                if hasattr(m, "gradient_checkpointing") and not isinstance(m, GradientCheckpointingLayer):
                    # a plain flag: the stub of Module.__setattr__ takes tensors and modules only
                    m.gradient_checkpointing = False  # type: ignore[assignment]
    else:
        top.activation_checkpointing_disable()


def build_meta(cfg: ModelConfig, kind: str, vocab_size: Optional[int], num_labels: int = 2) -> nn.Module:
    """The model's structure on the meta device: no weight memory, no weight download.

    Used to check a method's settings against the real module tree before anything is built,
    and by the estimator; the config comes from ``model_config``, as the real build's does.
    """
    config = model_config(cfg, kind, vocab_size, None, num_labels)
    with torch.device("meta"):
        return auto_class(kind).from_config(config, dtype=torch_dtype(cfg.dtype))


def check_head(config: Any, kind: str, name: str) -> None:
    if kind == "causal-lm" and config.model_type in ENCODER_TYPES:
        raise ConfigError(
            f"model={name}: a {config.model_type} encoder cannot run a causal-lm task; "
            f"allowed: a classification task (task=synthetic-cls or task=text-classification)"
        )


def head_names(model: nn.Module) -> set[str]:
    """Parameter names of a freshly created task head (sequence classification only)."""
    return {n for n, _ in model.named_parameters() if any(part in TASK_HEADS for part in n.split("."))}


def unfreeze_head(model: nn.Module) -> set[str]:
    """Make a fresh task head trainable (a method freezes the base, head included); its
    parameter names (``head_names``)."""
    head = head_names(model)
    for name, p in model.named_parameters():
        if name in head:
            p.requires_grad_(True)
    return head


def tensors_sha256(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over named tensors in name order: each name, then its bytes."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda nt: nt[0]):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer, in name order: identical base weights give
    identical checksums, whatever the method that is applied afterwards."""
    return tensors_sha256(model.state_dict().items())
