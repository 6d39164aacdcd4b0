"""Model families (tiny-llama, tiny-gpt2, minilm), local checkpoints, and the tasks: synthetic
data, the word-level tokenizer, and text-classification from local CSV/JSON folders."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from peftbench import models, tasks
from peftbench.errors import ConfigError
from peftbench.tasks import synthetic

from conftest import compose_config


def task_cfg(**kw):
    """A text-classification task config as the yaml composes it, with ``kw`` overridden."""
    base = OmegaConf.to_container(compose_config("model=minilm", "task=text-classification", "task.path=x").task)
    return SimpleNamespace(**{**base, **kw})


def write_csv(path, rows, header=("text", "label")):
    path.write_text("\n".join([",".join(header)] + [f'"{t}",{y}' for t, y in rows]) + "\n")


# --------------------------------------------------------------------------- synthetic tasks


def test_synthetic_tasks_are_deterministic_and_balanced():
    lm = compose_config("task=synthetic-lm", "task.num_train=64", "task.num_eval=8").task
    a, b = tasks.load(lm), tasks.load(lm)
    assert a.train_text == b.train_text and a.eval_text == b.eval_text
    assert a.train_text != a.eval_text and a.train_labels is None
    assert all(len(t.split()) >= lm.max_length for t in a.train_text)

    cls = compose_config("model=minilm", "task=synthetic-cls", "task.num_train=2000").task
    c, d = tasks.load(cls), tasks.load(cls)
    assert (c.train_text, c.train_labels) == (d.train_text, d.train_labels)
    assert c.num_labels == 2 and set(c.train_labels) == {0, 1}
    assert 0.4 < sum(c.train_labels) / len(c.train_labels) < 0.6
    assert c.train_text[:20] != c.eval_text[:20]
    # the label is the majority sentiment: check it from the word lists themselves
    for text, label in zip(c.train_text[:200], c.train_labels[:200]):
        words = text.split()
        pos = sum(w in synthetic.POSITIVE for w in words)
        neg = sum(w in synthetic.NEGATIVE for w in words)
        assert pos != neg and label == int(pos > neg)


def test_word_tokenizer_round_trip():
    cls = compose_config("model=minilm", "task=synthetic-cls", "task.num_train=200").task
    raw = tasks.load(cls)
    tok = tasks.word_tokenizer(raw.train_text, 1024)
    assert tok.convert_tokens_to_ids(tasks.SPECIALS) == [0, 1, 2, 3] and tok.pad_token_id == 0
    for text in raw.eval_text[:20]:
        ids = tok(text)["input_ids"]
        assert len(ids) == len(text.split()) and 1 not in ids  # every word known, no [UNK]
        assert tok.decode(ids) == text
    assert tok("Good FILM zzzunseen")["input_ids"][2] == tok.unk_token_id
    assert tok.decode(tok("Good FILM")["input_ids"]) == "good film"


# --------------------------------------------------------------------------- text-classification


def test_text_classification_from_csv_folder(tmp_path):
    write_csv(
        tmp_path / "train.csv", [(f"good {i}", "pos") for i in range(6)] + [(f"bad {i}", "neg") for i in range(4)]
    )
    write_csv(tmp_path / "validation.csv", [("fine, really", "pos"), ("awful", "neg"), ("ok", "pos")])
    raw = tasks.load(task_cfg(path=str(tmp_path)))
    assert raw.label_names == ["neg", "pos"] and raw.num_labels == 2
    assert raw.train_labels == [1] * 6 + [0] * 4
    assert raw.eval_text == ["fine, really", "awful", "ok"] and raw.eval_labels == [1, 0, 1]

    sub = tasks.load(task_cfg(path=str(tmp_path), num_train=5, num_eval=2))
    again = tasks.load(task_cfg(path=str(tmp_path), num_train=5, num_eval=2))
    assert len(sub.train_text) == 5 and len(sub.eval_text) == 2
    assert sub.train_text == again.train_text  # seeded subset
    assert sub.train_text != raw.train_text[:5]  # a shuffled subset, not the file's head


def test_text_classification_from_json_folder(tmp_path):
    rows = [{"sentence": f"s{i}", "y": i % 3 + 1} for i in range(9)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "test.json").write_text(json.dumps(rows[:4]))  # a JSON array works too
    cfg = task_cfg(path=str(tmp_path), text_column="sentence", label_column="y", eval_split="test")
    tasks.check(cfg)
    raw = tasks.load(cfg)
    assert raw.label_names == ["1", "2", "3"]  # integer labels 1..3 become class ids 0..2
    assert raw.train_labels == [i % 3 for i in range(9)] and raw.eval_labels == [0, 1, 2, 0]
    assert raw.eval_text == ["s0", "s1", "s2", "s3"]


def test_text_classification_errors(tmp_path):
    write_csv(tmp_path / "train.csv", [("a", 0), ("b", 1)])
    with pytest.raises(ConfigError, match=r"^task.path=null: "):
        tasks.check(task_cfg(path=None))
    with pytest.raises(ConfigError, match=r"^task.path=.*nope: no such folder"):
        tasks.check(task_cfg(path=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match=r"^task.eval_split=validation: no validation.csv.*files there: train.csv"):
        tasks.check(task_cfg(path=str(tmp_path)))
    write_csv(tmp_path / "validation.csv", [("c", 0)])
    with pytest.raises(ConfigError, match=r"^task.text_column=sentence: .*allowed: text, label$"):
        tasks.check(task_cfg(path=str(tmp_path), text_column="sentence"))
    with pytest.raises(ConfigError, match=r"^task.label_column=y: no such column in train.csv; allowed: text, label$"):
        tasks.load(task_cfg(path=str(tmp_path), label_column="y"))
    with pytest.raises(ConfigError, match=r"^task.num_train=null: synthetic-cls generates"):
        tasks.load(compose_config("model=minilm", "task=synthetic-cls", "task.num_train=null").task)
    with pytest.raises(ConfigError, match=r"^task.kind=causal-lm: "):
        tasks.check(task_cfg(path=str(tmp_path), kind="causal-lm"))
    for check in (tasks.check, tasks.load):
        with pytest.raises(ConfigError) as e:
            check(task_cfg(path=str(tmp_path / "nope")))
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- model families


def test_default_task_per_family(tmp_path):
    assert compose_config().task.name == "synthetic-lm"
    assert compose_config("model=tiny-llama").task.name == "synthetic-lm"
    assert compose_config("model=tiny-gpt2").task.name == "synthetic-lm"
    minilm = compose_config("model=minilm")
    assert (minilm.task.name, minilm.task.kind) == ("synthetic-cls", "classification")
    explicit = compose_config("model=minilm", "task=text-classification", f"task.path={tmp_path}")
    assert (explicit.task.name, explicit.task.path) == ("text-classification", str(tmp_path))
    assert compose_config("task=synthetic-cls", "model=tiny-gpt2").task.name == "synthetic-cls"
    tc = compose_config("model=minilm", "task=text-classification").task
    assert (tc.max_length, tc.num_train, tc.num_eval, tc.path) == (64, None, None, None)


def test_minilm_has_a_fresh_seeded_head():
    cfg = compose_config("model=minilm", "task=synthetic-cls").model
    tok = models.load_tokenizer(cfg)
    assert type(tok).__name__.startswith("Bert") and len(tok) == 30522

    def build(seed):
        return models.build(OmegaConf.merge(cfg, {"init_seed": seed}), "classification", len(tok), tok.pad_token_id, 2)

    a, b, c = build(0), build(0), build(1)
    assert sum(p.numel() for p in a.parameters()) == 22_713_986  # 22,713,216 encoder + 384*2+2 head
    assert models.head_names(a) == {"classifier.weight", "classifier.bias"}
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    sa, sc = a.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sc[k]) for k in sa if not k.startswith("classifier."))  # pretrained body
    from safetensors.torch import load_file

    ckpt = load_file(f"{cfg.name_or_path}/model.safetensors")
    assert torch.equal(sa["bert.pooler.dense.weight"], ckpt["pooler.dense.weight"])


def test_tiny_gpt2_size():
    cfg = compose_config("model=tiny-gpt2").model
    model = models.build(cfg, "causal-lm", 1024, 0, 0)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.lm_head.weight is model.transformer.wte.weight
    # embeddings (1024 + 512 positions) x 256, 4 blocks of 789,760, final LayerNorm
    assert sum(p.numel() for p in model.parameters()) == (1024 + 512) * 256 + 4 * 789_760 + 512


@pytest.fixture(scope="module")
def saved_checkpoints(tmp_path_factory):
    """Tiny LLaMA causal-LM and BERT classification checkpoints saved with save_pretrained,
    with a tokenizer (and one LLaMA without)."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("ckpt")
    texts = synthetic.sentiment_text(200, 0)[0] + synthetic.markov_text(50, 64, 1234, 1)
    tok = tasks.word_tokenizer(texts, 600)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
        )
    )
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_labels=2,
        )
    )
    for name, model, with_tok in (("llama", llama, True), ("bert", bert, True), ("llama-notok", llama, False)):
        model.save_pretrained(root / name)
        if with_tok:
            tok.save_pretrained(root / name)
    return root, len(tok)


def test_local_checkpoint_runs(saved_checkpoints, tiny_run):
    d, vocab = saved_checkpoints
    rec, _ = tiny_run(f"model.name_or_path={d / 'llama'}", "model.name=local-llama", "method=lora")
    assert rec["status"] == "ok", rec["error"]
    assert rec["model_config"]["model_type"] == "llama" and rec["model_config"]["vocab_size"] == vocab
    assert rec["metrics"]["trainable_params"] == 2 * 8 * ((32 + 32) + (32 + 16))

    rec, _ = tiny_run(f"model.name_or_path={d / 'bert'}", "model.name=local-bert", "task=synthetic-cls", "method=lora")
    assert rec["status"] == "ok", rec["error"]
    assert rec["metrics"]["trainable_params"] == 2 * 8 * 2 * (32 + 32) + (32 * 2 + 2)
    assert 0.0 <= rec["metrics"]["eval_accuracy"] <= 1.0

    # no tokenizer saved: the task's word-level tokenizer must fit in the checkpoint's embedding
    cfg = compose_config(f"model.name_or_path={d / 'llama-notok'}").model
    assert models.load_tokenizer(cfg) is None
    with pytest.raises(ConfigError, match=rf"embedding has {vocab} rows but the tokenizer has {vocab + 1} tokens"):
        models.build(cfg, "causal-lm", vocab + 1, 0, 0)
    assert models.build(cfg, "causal-lm", vocab, 0, 0).config.vocab_size == vocab


def test_bad_checkpoint_folder_is_a_config_error(tmp_path):
    cfg = compose_config(f"model.name_or_path={tmp_path}").model
    with pytest.raises(ConfigError, match=r"^model.name_or_path=.*cannot load its config.json"):
        models.build_meta(cfg, "causal-lm", 1024)


# --------------------------------------------------------------------------- end to end

# (model, method, trainable parameters in closed form with the tiny_run settings; None: all)
E2E = [
    ("tiny-llama", "full", None),
    ("tiny-llama", "lora", 4 * 8 * ((256 + 256) + (256 + 128))),  # q: 256->256, v: 256->4*32
    ("tiny-gpt2", "full", None),
    ("tiny-gpt2", "lora", 4 * 8 * (256 + 3 * 256)),  # fused c_attn: 256->768
    ("minilm", "full", None),
    ("minilm", "lora", 6 * 8 * 2 * (384 + 384) + (384 * 2 + 2)),  # query, value + classifier
]


@pytest.mark.parametrize("model,method,trainable", E2E, ids=[f"{m}-{k}" for m, k, _ in E2E])
def test_tiny_run_end_to_end(tiny_run, model, method, trainable):
    task = "synthetic-cls" if model == "minilm" else "synthetic-lm"  # each family's default task
    rec, path = tiny_run(f"model={model}", f"task={task}", f"method={method}")
    assert rec["status"] == "ok", rec["error"]
    assert path.exists() and rec["model"] == model and rec["method"] == method
    m = rec["metrics"]
    want = trainable if trainable is not None else m["total_params"]
    assert m["trainable_params"] == want
    assert len(rec["train_losses"]) == 4 and all(torch.isfinite(torch.tensor(rec["train_losses"])))
    if model == "minilm":
        assert rec["task"] == "synthetic-cls" and 0.0 <= m["eval_accuracy"] <= 1.0
        assert rec["method_config"]["head_modules"] == ["classifier"]
    else:
        assert rec["task"] == "synthetic-lm" and "eval_accuracy" not in m
