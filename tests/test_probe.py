"""The likelihood probe: its scores equal log-probs computed by hand from full logits, and
its retention counts what the base knew."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from loramoe.evaluate.probe import (
    SharedPrefix,
    cache_name,
    choice_logprobs,
    context_ids,
    continuation_ids,
    fact_tokens,
    pack_options,
    packed_length,
    probe_facts,
    probe_retention,
    probe_summary,
    shared_prefix,
)
from loramoe.evaluate.stats import wilson_interval
from loramoe.model import load_base_model

FACTS = pd.DataFrame({
    "id": ["a", "b", "c", "d"], "task": ["t1", "t1", "t2", "t2"],
    "prompt": ["What is the capital of Japan?", "Which country is Lyon in?", "Hi there",
               "A longer question, so the batch needs left padding?"],
    "answer_prefix": ["The capital of Japan is", "Lyon is in", "", "It is"],
    "choices": [["Tokyo", "Osaka", "Kyoto", "Paris"], ["France", "Spain", "United States"],
                ["x"], ["yes", "no"]],
})
# every context starts with the same tokens, as a chat header does (the tiny tokenizer has
# no chat template): the probe runs them once
LED_FACTS = FACTS.assign(prompt="Question: " + FACTS["prompt"])


def hand_logprob(model, tokenizer, prompt: str, prefix: str, option: str) -> float:
    """Sum of log-softmax over the option's tokens from one plain forward of the whole
    sequence (fp64 softmax, no cache, no batching)."""
    context = context_ids(tokenizer, prompt, prefix)
    option_ids = continuation_ids(tokenizer, prefix, option)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + option_ids])).logits[0]
    logp = logits.double().log_softmax(-1)
    return sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(option_ids))


def test_probe_equals_hand_computed_logprobs_on_the_tiny_model(tiny_model_dir):
    model, tokenizer = load_base_model(str(tiny_model_dir))
    # 3: batches of mixed lengths; 1: fact "c" alone, whose one-token option needs no 2nd pass
    for batch_size in (3, 1):
        got = probe_facts(model, tokenizer, FACTS, batch_size=batch_size)
        for row, fact in FACTS.iterrows():
            hand = [hand_logprob(model, tokenizer, fact.prompt, fact.answer_prefix, c)
                    for c in fact.choices]
            assert got["gold_logprob"][row] == pytest.approx(hand[0], rel=1e-5, abs=1e-5)
            assert got["mc_correct"][row] == (max(range(len(hand)),
                                                  key=hand.__getitem__) == 0)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_dir(request, tmp_path_factory):
    from conftest import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp(request.param), arch=request.param)


def test_every_choice_score_equals_hand_computed_logprobs(model_dir):
    # distractors too: the first token comes from the context's last state, later ones from
    # the option's own states in the same row; options of one fact share a row, so one that
    # saw another's tokens (block mask) or took the wrong positions (rotary in Llama, learned
    # in GPT-2) would score differently from the plain forward
    model, tokenizer = load_base_model(str(model_dir))
    contexts, options, hand = [], [], []
    for fact in FACTS.itertuples():
        contexts.append(context_ids(tokenizer, fact.prompt, fact.answer_prefix))
        options.append([continuation_ids(tokenizer, fact.answer_prefix, c)
                        for c in fact.choices])
        hand.append([hand_logprob(model, tokenizer, fact.prompt, fact.answer_prefix, c)
                     for c in fact.choices])
    assert {len(o) for opts in options for o in opts} > {1}, "needs mixed option lengths"
    assert max(sum(len(o) > 1 for o in opts) for opts in options) > 1, "needs options to pack"
    got = choice_logprobs(model, tokenizer, contexts, options)  # (4, 4)
    for f, scores in enumerate(hand):
        assert got[f, :len(scores)].tolist() == pytest.approx(scores, rel=1e-5, abs=1e-5)
        assert torch.isinf(got[f, len(scores):]).all()


def test_the_shared_prefix_runs_once_and_changes_no_score(model_dir):
    """The first tokens every context shares (a chat header; here a common lead, the tiny
    tokenizer having no chat template) run once and are read from their KV cache: each score
    still equals the hand-computed log-prob, and the batches never grow the cache."""
    model, tokenizer = load_base_model(str(model_dir))
    facts = LED_FACTS
    contexts, options = fact_tokens(tokenizer, facts)
    prefix = shared_prefix(model, contexts)
    lead = len(tokenizer("Question: ", add_special_tokens=False)["input_ids"])
    assert prefix.length == lead and prefix.cache.get_seq_length() == lead
    cached = choice_logprobs(model, tokenizer, contexts, options, prefix)
    for f, fact in enumerate(facts.itertuples()):
        hand = [hand_logprob(model, tokenizer, fact.prompt, fact.answer_prefix, c)
                for c in fact.choices]
        assert cached[f, :len(hand)].tolist() == pytest.approx(hand, rel=1e-5, abs=1e-5)
    whole = choice_logprobs(model, tokenizer, contexts, options, SharedPrefix())
    torch.testing.assert_close(cached, whole, rtol=1e-5, atol=1e-5)
    again = choice_logprobs(model, tokenizer, contexts[:2], options[:2], prefix)
    torch.testing.assert_close(again, cached[:2, :again.shape[1]], rtol=1e-5, atol=1e-5)
    assert prefix.cache.get_seq_length() == lead  # each batch copies it
    got = probe_facts(model, tokenizer, facts, batch_size=3)
    assert got["gold_logprob"].tolist() == pytest.approx(cached[:, 0].tolist(), rel=1e-5)


def test_no_shared_prefix_for_one_context_or_none_in_common():
    assert shared_prefix(None, [[1, 2, 3]]).length == 0
    assert shared_prefix(None, [[1, 2], [3, 2]]).length == 0
    assert shared_prefix(None, []).length == 0


def test_the_cache_argument_is_named_as_the_backbone_names_it():
    class Renamed(torch.nn.Module):  # transformers 5.25
        def forward(self, input_ids, cache=None, past_key_values=None): ...

    class Older(torch.nn.Module):  # transformers 5.17
        def forward(self, input_ids, past_key_values=None): ...

    class NoCache(torch.nn.Module):  # a model without one: every row holds its context
        def forward(self, input_ids, attention_mask=None): ...

    assert [cache_name(m()) for m in (Renamed, Older, NoCache)] == \
        ["cache", "past_key_values", None]


def test_rows_without_choices_are_not_probed(tiny_model_dir):
    model, tokenizer = load_base_model(str(tiny_model_dir))
    frame = FACTS.assign(choices=[[], ["a", "b"], [], []])
    assert probe_facts(model, tokenizer, frame)["id"].tolist() == ["b"]


def test_probe_retention_counts_base_known_facts_per_group():
    base = pd.DataFrame({"id": list("abcd"), "gold_logprob": [-1.0, -2.0, -1.0, -5.0],
                         "mc_correct": [True, True, True, False]})
    tuned = pd.DataFrame({"id": list("abcd"), "gold_logprob": [-1.5, -2.0, -3.0, -1.0],
                          "mc_correct": [True, False, True, True]})
    out = probe_retention(base, tuned, FACTS, untrained_tasks={"t2"})
    assert (out["kept"], out["base_correct"]) == (2, 3)  # d was not known by the base
    assert out["groups"]["trained"]["overall"] == 0.5  # a kept, b lost
    assert out["groups"]["untrained"]["overall"] == 1.0  # c kept
    assert out["logprob_change"] == pytest.approx(((-0.5 + 0.0) / 2 + (-2.0)) / 2)  # macro
    assert sorted(out["kept_ids"]) == ["a", "c"]
    summary = probe_summary(tuned, FACTS)
    assert summary["mc_accuracy"] == 0.75 and summary["facts"] == 4
    # every per-relation share carries its Wilson interval (before: the share alone)
    assert out["per_task"] == {"t1": 0.5, "t2": 1.0}
    assert out["per_task_ci"] == {"t1": wilson_interval(1, 2), "t2": wilson_interval(1, 1)}
    assert summary["per_task"]["t1"]["mc_accuracy_ci"] == wilson_interval(1, 2)
    assert summary["per_task"]["t2"]["mc_accuracy_ci"] == wilson_interval(2, 2)


def test_an_eval_file_without_choices_is_not_probed(tiny_model_dir):
    # Before the fix: KeyError 'answer_prefix' for a user's eval file (no probe columns).
    model, tokenizer = load_base_model(str(tiny_model_dir))
    plain = FACTS.drop(columns=["choices", "answer_prefix"])
    assert probe_facts(model, tokenizer, plain).empty
    assert probe_facts(model, tokenizer, FACTS.drop(columns=["answer_prefix"]))["id"].tolist() \
        == ["a", "b", "c", "d"]


def test_packed_rows_have_the_length_the_probe_sorts_by():
    contexts = [[1, 2, 3], [4], [5, 6]]
    options = [[[7], [8, 9, 10]], [[11, 12], [13, 14], [15]], [[16, 17, 18, 19]]]
    packed = pack_options(contexts, options)
    # context, then each option's tokens but its last: 3 + 0 + 2, 1 + 1 + 1 + 0, 2 + 3
    assert [len(row) for row in packed.rows] == [5, 3, 5]
    assert [packed_length(c, o) for c, o in zip(contexts, options, strict=True)] == [5, 3, 5]
    assert [len(s) for s in packed.segments] == [5, 3, 5]
    assert packed.rows[0] == [1, 2, 3, 8, 9]
