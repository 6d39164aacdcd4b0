"""Batched evaluation (``quality.generation``, ``quality.forgetting``) equals evaluation one
example at a time, on tiny random LLaMA (GQA) and GPT-2 models, base and with LoRA, a bottleneck
adapter, prefix tuning and prompt tuning applied (their new parameters perturbed, so that no
method computes the base model):

- greedy generation from left-padded prompts of different lengths: the same token ids and the
  same decoded texts as each prompt alone, unpadded, through the model's own ``generate`` (the
  reference), with rows that stop at end-of-sequence at different steps;
- choice scoring from right-padded prompt x choice rows: the summed log-probabilities of each
  choice alone (one unpadded forward per prompt + choice), within 1e-5 nats, and the same choice;
- forgetting: the per-sequence next-token log-probabilities and the divergence within 1e-6, the
  base's reference responses identical;
- all of it under ``torch.inference_mode``, the model's train/eval mode restored.

Everything runs in float32, the dtype the harness evaluates these models in. Equality of tokens
is exact here, not "mostly": the only difference padding makes is float rounding of differently
shaped products (~1e-7 in a logit), and a greedy step flips only where the top two logits of a
row are that close, which these seeded models never have (were one to, the principled remedy
is to compare in float64, ``model.double()``, never a looser test).
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from tiny_models import FAMILIES, VOCAB, perturb

import methods
from methods.adapter import AdapterConfig
from methods.lora import LoRAConfig
from methods.prefix import PrefixConfig
from methods.prompt import PromptConfig
from peftbench import tasks
from peftbench.quality import forgetting, generation
from peftbench.tasks import answers

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

CPU = torch.device("cpu")
METHODS = {
    "base": None,
    "lora": LoRAConfig(rank=4),
    "adapter": AdapterConfig(),
    "prefix": PrefixConfig(num_virtual_tokens=5),
    "prompt": PromptConfig(num_virtual_tokens=5),
}
CASES = [(f, m) for f in ("llama", "gpt2") for m in METHODS]
WORDS = (
    "the sky is blue and the sea is green while red amber stone lies under a tall old tree near "
    "quiet river banks where small birds sing bright songs every morning before warm sunlight "
    "reaches cold hills beyond distant grey mountains covered with soft white snow during long "
    "dark winter nights people walk slowly along narrow roads carrying heavy bags full of fresh "
    "bread cheese apples honey milk salt pepper onions garlic carrots beans rice corn wheat barley "
    "oats plums pears figs dates grapes lemons limes melons berries nuts seeds herbs what colour do ?"
).split()  # 93 distinct: with [PAD] [UNK] [BOS] [EOS], every id of the tiny models' 97 is a word
QUESTIONS = (  # 2 to 16 tokens, no two alike: left padding of up to 14 positions
    "what colour is the sky ?",
    "the sea",
    "where do small birds sing bright songs every morning before warm sunlight reaches cold hills ?",
    "is the tree tall ?",
    "people walk slowly along narrow roads carrying heavy bags",
    "red amber stone",
    "what lies under a tall old tree near quiet river banks ?",
)
CHOICES = ["blue", "green sea", "red amber stone"]  # 1, 2 and 3 tokens
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def tok():
    t = tasks.word_tokenizer([" ".join(WORDS)], VOCAB)
    assert len(t) == VOCAB and t.pad_token_id == 0 and t.eos_token_id == 3
    return t


def prompts_of(tok) -> list[list[int]]:
    ids = [list(tok(q, add_special_tokens=False)["input_ids"]) for q in QUESTIONS]
    assert len({len(p) for p in ids}) == len(ids)  # every batch mixes lengths
    return ids


def model_with(family: str, method: str) -> torch.nn.Module:
    """The tiny model of ``family`` with ``method`` applied and its parameters perturbed (lightly:
    a bottleneck adapter perturbed by the default 0.3 drowns the model, which then repeats one
    token whatever the prompt)."""
    model = FAMILIES[family]()
    cfg = METHODS[method]
    if cfg is None:
        return model
    m = methods.build(OmegaConf.structured(cfg))
    torch.manual_seed(0)
    model = m.apply(model)
    perturb(model, m.adapter_names(model), scale=0.02)
    return model.eval()


def alone(model, prompt: list[int], eos_id) -> list[int]:
    """Reference: greedy decoding of one unpadded prompt by the model's own ``generate``."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=0,
        )
    new = out[0, len(prompt) :].tolist()
    return new[: new.index(eos_id)] if eos_id in new else new


def stopper(free: list[list[int]]) -> int:
    """The generated token that, taken as end-of-sequence, stops the rows at the most distinct
    steps (a row without it runs to the end)."""

    def steps(t: int) -> int:
        return len({f.index(t) if t in f else len(f) for f in free})

    return max(sorted({t for f in free for t in f}), key=steps)


def choice_alone(model, prompt: list[int], choice: list[int]) -> float:
    """Reference: the summed log-probability (nats) of ``choice`` after ``prompt``, one unpadded row."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + choice])).logits[0], dim=-1)
    return sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(choice))


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("family,method", CASES)
def test_generation_batched_equals_each_prompt_alone(tok, family, method):
    model = model_with(family, method)
    prompts = prompts_of(tok)
    free = [alone(model, p, None) for p in prompts]  # no EOS: every row runs NEW_TOKENS steps
    assert all(len(f) == NEW_TOKENS for f in free)
    eos = stopper(free)
    want = [alone(model, p, eos) for p in prompts]
    assert len({len(w) for w in want}) > 1
    for stop, expected in ((None, free), (eos, want)):
        for bs in (1, 3, 16):
            got = generation.generate_all(model, prompts, NEW_TOKENS, stop, 0, CPU, batch_size=bs)
            assert got == expected, (bs, stop)


@pytest.mark.parametrize("family,method", CASES)
def test_evaluate_batched_equals_one_by_one(tok, family, method):
    """Texts, chosen answers and both accuracies at batch sizes 1 and 4 equal each other and
    the one-prompt references (the choice its first distinguishing token picks); choice scores
    within 1e-5 nats of each choice scored alone."""
    model = model_with(family, method)
    prompts = prompts_of(tok)
    refs = ["blue", "green sea", "red amber stone", "blue", "red amber stone", "green sea", "blue"]
    exact = answers.rule("exact")
    texts = [tok.decode(alone(model, p, tok.eos_token_id), skip_special_tokens=True) for p in prompts]
    ids = generation.choice_ids(tok, CHOICES)
    scores = [[choice_alone(model, p, c) for c in ids] for p in prompts]
    # the choices' first tokens differ (blue, green, red): the first distinguishing token decides
    firsts = [[choice_alone(model, p, c[:1]) for c in ids] for p in prompts]
    best = [CHOICES[max(range(3), key=f.__getitem__)] for f in firsts]
    for bs in (1, 4):
        found, pred = generation.evaluate(model, tok, prompts, refs, exact, NEW_TOKENS, CHOICES, CPU, batch_size=bs)
        assert pred.generated == texts and pred.chosen == best, bs
        assert found == {
            "generate_accuracy": answers.accuracy(texts, refs, exact),
            "choice_accuracy": answers.accuracy(best, refs, exact),
        }
    batched = generation.choice_logprobs_batch(model, prompts, ids, CPU)
    one = [generation.choice_logprobs(model, p, ids, CPU) for p in prompts]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(scores), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(one), torch.tensor(scores), atol=1e-5, rtol=0)
    # the first tokens scored from generation's first step (left-padded), the rest from the rows
    first = [f for _, f in generation.generate_scored(model, prompts, 1, None, 0, CPU, [c[0] for c in ids])]
    shared = generation.choice_logprobs_batch(model, prompts, ids, CPU, first)
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(scores), atol=1e-5, rtol=0)
    # the scores are far apart, so the choice is decided by the model, not by rounding
    assert min(abs(a - b) for s in scores for a in s for b in s if a != b) > 1e-3


@pytest.mark.parametrize("method", ["base", "prefix"])
def test_one_token_choices_cost_no_forward_beyond_generation(tok, method):
    """With one-token choices, ``evaluate`` runs exactly the forwards generation runs (the
    choices are scored from its first step); a longer choice adds one forward per batch."""
    model = model_with("llama", method)
    prompts = prompts_of(tok)
    refs = ["blue"] * len(prompts)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))

    def forwards(choices):
        calls.clear()
        generation.evaluate(model, tok, prompts, refs, answers.rule("exact"), 3, choices, CPU, batch_size=4)
        return len(calls)

    plain = forwards(None)
    assert forwards(["blue", "green", "red"]) == plain
    assert forwards(["blue", "green sea"]) == plain + 2  # 7 prompts, 4 a batch: 2 batches


def test_evaluate_runs_under_inference_mode_with_padding_and_restores_the_mode(tok):
    model = FAMILIES["llama"]().train()
    seen: list[tuple[bool, bool]] = []  # per forward: inference mode on, any padding in the mask

    def spy(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        seen.append((torch.is_inference_mode_enabled(), mask is not None and bool((mask == 0).any())))

    model.register_forward_pre_hook(spy, with_kwargs=True)
    prompts = prompts_of(tok)
    refs = ["blue"] * len(prompts)
    generation.evaluate(model, tok, prompts, refs, answers.rule("exact"), NEW_TOKENS, CHOICES, CPU, batch_size=4)
    assert model.training
    assert seen and all(on for on, _ in seen)
    assert any(padded for _, padded in seen)  # the batches really were padded
    count = len(seen)
    forgetting.skill(model, tok, "plain", 5, CPU, batch_size=5)
    assert model.training and len(seen) > count and all(on for on, _ in seen)


# ------------------------------------------------------------- decoding drafted by the loss pass


class EosAs:
    """``tok`` with another token id as end-of-sequence (one the tiny models do generate)."""

    def __init__(self, tok, eos: int):
        self.tok, self.eos_token_id = tok, eos

    def __call__(self, *args, **kwargs):
        return self.tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def loss_pass(model, tok, prompts, answers_, batch_size=3, measured=False) -> tuple[float, dict]:
    """``run.Evaluation.loss`` over prompt + answer rows (the prompts take no loss), with the
    drafts it reads for every row; (eval loss, drafts). ``measured``: as the pass whose memory
    is measured (the split's order, every position's logits), else shortest first with logits
    at the labelled positions only."""
    from types import SimpleNamespace

    from peftbench import run

    split = tasks.Split([p + a for p, a in zip(prompts, answers_)], None, [len(p) for p in prompts])
    cfg = OmegaConf.create({"task": {"kind": "causal-lm", "num_generate": None}, "train": {"batch_size": batch_size}})
    raw = SimpleNamespace(eval_prompts=[[]] * len(prompts), choices=CHOICES)
    s = SimpleNamespace(model=model, tokenizer=tok, device=CPU, raw=raw)
    ev = run.Evaluation(cfg, s, SimpleNamespace(precision="fp32"), split, split, {}, {}, None)
    drafts: dict = {}
    return ev.loss(measured=measured, drafts=drafts)["eval_loss"], drafts


def decided(want: list[int], answer: list[int]) -> bool:
    """Whether a draft along ``answer`` decides the decoding ``want`` (tokens before EOS, at most
    NEW_TOKENS): the step that ends it (EOS's, or the last token's) follows the answer's tokens."""
    end = len(want) if len(want) < NEW_TOKENS else NEW_TOKENS - 1
    return end < len(answer) and answer[:end] == want[:end]


def other(t: int) -> int:
    """A token other than ``t``."""
    return 5 if t != 5 else 6


def test_settle_follows_greedy_while_it_picks_the_answers_tokens():
    d = generation.Draft(answer=[10, 11, 12], greedy=[10, 11, 12], first={})
    assert generation.settle(d, 5, None) == ([10, 11, 12], False)  # the answer ends first: on from there
    assert generation.settle(d, 2, None) == ([10, 11], True)  # the budget
    assert generation.settle(d, 0, None) == ([], True)
    assert generation.settle(d, 5, 11) == ([10], True)  # end-of-sequence, not a new token
    left = generation.Draft(answer=[10, 11, 12], greedy=[10, 20, 30], first={})
    assert generation.settle(left, 5, None) == ([10, 20], False)  # 30 followed 11, not 20: unknown
    assert generation.settle(left, 5, 20) == ([10], True)
    assert generation.settle(left, 2, None) == ([10, 20], True)


@pytest.mark.parametrize("family,method", CASES)
def test_decoding_drafted_by_the_loss_pass_equals_decoding_alone(tok, family, method):
    """Generation decided by the eval-loss pass's logits (the reference answer as a speculative
    draft) equals each prompt decoded alone, texts and chosen answers: rows whose answer is their
    greedy decoding need no decoding of their own; rows whose answer leaves greedy's path at once
    or after 2 tokens, or ends before decoding does, are decoded on from the tokens decided. The
    choices' first tokens are scored from the loss pass's first step."""
    model = model_with(family, method)
    prompts = prompts_of(tok)
    free = [alone(model, p, None) for p in prompts]
    eos = stopper(free)
    stop = EosAs(tok, eos)
    want = [alone(model, p, eos) for p in prompts]
    answers_ = [
        want[0] + [eos],
        free[1],
        [other(free[2][0])],
        free[3][:2] + [other(free[3][2]), 9],
        free[4][:1],
        want[5] + [eos],
        [other(free[6][0]), 7, 8],
    ]
    loss, drafts = loss_pass(model, stop, prompts, answers_)
    assert sorted(drafts) == list(range(len(prompts)))
    texts = [tok.decode(w, skip_special_tokens=True) for w in want]
    firsts = [[choice_alone(model, p, c[:1]) for c in generation.choice_ids(tok, CHOICES)] for p in prompts]
    best = [CHOICES[max(range(3), key=f.__getitem__)] for f in firsts]
    refs = ["blue"] * len(prompts)
    exact = answers.rule("exact")
    calls: list[int] = []
    getattr(model, "base_model", model).register_forward_hook(lambda *_: calls.append(1))  # under wrappers
    _, plain = generation.evaluate(model, stop, prompts, refs, exact, NEW_TOKENS, CHOICES, CPU, 4)
    forwards = len(calls)
    listed = [drafts[i] for i in range(len(prompts))]
    found, pred = generation.evaluate(model, stop, prompts, refs, exact, NEW_TOKENS, CHOICES, CPU, 4, listed)
    assert pred.generated == plain.generated == texts
    assert pred.chosen == plain.chosen == best
    assert found["generate_accuracy"] == answers.accuracy(texts, refs, exact)
    settled = sum(decided(w, a) for w, a in zip(want, answers_))
    assert pred.settled == settled and 0 < settled < len(prompts)  # both paths ran
    assert len(calls) - forwards < forwards  # fewer forwards than decoding every row
    # the pass whose memory is measured (every position's logits) reads the same drafts
    full, same = loss_pass(model, stop, prompts, answers_, measured=True)
    assert loss == pytest.approx(full, rel=1e-6)
    for i, d in drafts.items():
        assert (d.answer, d.greedy) == (same[i].answer, same[i].greedy)
        assert d.first == pytest.approx(same[i].first, abs=1e-5)


@pytest.mark.parametrize("family,method", CASES)
def test_the_loss_from_the_labelled_positions_logits_equals_the_models_own(tok, family, method):
    """The unmeasured passes compute the logits only where they predict a labelled token
    (``logits_to_keep``; prompt tuning counts the positions of the real tokens): the loss equals
    the model's own loss over every position's logits, and only those positions are computed."""
    from peftbench.train import evaluate

    model = model_with(family, method)
    prompts = prompts_of(tok)
    answers_ = [[5 + i] * (1 + i % 3) for i in range(len(prompts))]
    split = tasks.Split([p + a for p, a in zip(prompts, answers_)], None, [len(p) for p in prompts])
    widths: list[int] = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda _m, args, _o: widths.append(args[0].shape[1]))
    full = evaluate(model, tasks.eval_batches(split, 3, 0, "causal-lm"), "causal-lm", CPU)
    few = evaluate(model, tasks.eval_batches(split, 3, 0, "causal-lm"), "causal-lm", CPU, labelled_only=True)
    assert few["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-6)
    batches = [b["labels"] for b in tasks.eval_batches(split, 3, 0, "causal-lm")]
    virtual = 5 if method == "prompt" else 0
    assert widths[: len(batches)] == [b.shape[1] + virtual for b in batches]  # every position
    assert widths[len(batches) :] == [int((b[:, 1:] != -100).any(0).sum()) for b in batches]


def test_a_generation_config_that_changes_greedy_steps_is_decoded_in_full(tok):
    """A repetition penalty changes greedy's token where the draft's logits do not: decoding
    then ignores the drafts."""
    model = model_with("llama", "lora")
    prompts = prompts_of(tok)
    free = [alone(model, p, None) for p in prompts]
    _, drafts = loss_pass(model, tok, prompts, free)
    listed = [drafts[i] for i in range(len(prompts))]
    refs, exact = ["blue"] * len(prompts), answers.rule("exact")
    _, pred = generation.evaluate(model, tok, prompts, refs, exact, NEW_TOKENS, None, CPU, 4, listed)
    assert pred.settled == len(prompts)
    model.generation_config.repetition_penalty = 5.0
    _, pred = generation.evaluate(model, tok, prompts, refs, exact, NEW_TOKENS, None, CPU, 4, listed)
    _, plain = generation.evaluate(model, tok, prompts, refs, exact, NEW_TOKENS, None, CPU, 4)
    assert pred.settled == 0 and pred.generated == plain.generated
    assert pred.generated != [tok.decode(f, skip_special_tokens=True) for f in free]  # it did change them


def test_batch_size_must_be_positive(tok):
    with pytest.raises(ValueError, match="batch_size=0: must be >= 1"):
        generation.generate_all(FAMILIES["llama"](), prompts_of(tok), 2, None, 0, CPU, batch_size=0)


# --------------------------------------------------------------------------- forgetting


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
def test_divergence_batched_equals_one_sequence_at_a_time(tok, tmp_path, monkeypatch, method):
    base = FAMILIES["llama"]()
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "batched"))
    ref = forgetting.reference(base, tok, "plain", 6, CPU, "sha", batch_size=16)
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "one"))
    ref_one = forgetting.reference(base, tok, "plain", 6, CPU, "sha", batch_size=1)
    assert ref.sequences == ref_one.sequences and ref.starts == ref_one.starts
    assert len({len(s) for s in ref.sequences}) > 1  # padding happens
    for a, b in zip(ref.logp, ref_one.logp):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    alone_logp = [forgetting.next_token_logp(base, s, t, CPU) for s, t in zip(ref.sequences, ref.starts)]
    for a, b in zip(ref_one.logp, alone_logp):
        assert torch.equal(a, b)  # batch_size=1 is the single-sequence path

    model = model_with("llama", method).train()
    batched = forgetting.divergence(model, ref, CPU, batch_size=16)
    one = forgetting.divergence(model, ref, CPU, batch_size=1)
    assert model.training
    assert batched["forgetting_kl"] > 1e-4  # the method moved the model (prompt tuning least: 2.7e-4)
    for key in ("forgetting_kl", "forgetting_ce_delta"):
        assert batched[key] == pytest.approx(one[key], abs=1e-6)
    mine = forgetting.next_token_logps(model, ref.sequences, ref.starts, CPU, batch_size=5)
    for a, s, t in zip(mine, ref.sequences, ref.starts):
        torch.testing.assert_close(a, forgetting.next_token_logp(model, s, t, CPU), atol=1e-6, rtol=0)


def test_divergence_of_the_base_is_exactly_zero_at_the_same_batch_size(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path))
    base = FAMILIES["gpt2"]()
    ref = forgetting.reference(base, tok, "plain", 6, CPU, "sha", batch_size=4)
    assert forgetting.divergence(base, ref, CPU, batch_size=4) == {"forgetting_kl": 0.0, "forgetting_ce_delta": 0.0}
