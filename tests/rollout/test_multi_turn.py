"""ChatTrajectory: multi-turn samples equal the chat template's tokenisation of the whole conversation, and the loss
mask covers exactly the model's turns (a seeded property test over random conversations)."""

import copy
import random

import pytest

from slime.rollout.multi_turn import ChatTrajectory
from slime.utils.types import Sample

WORDS = [
    "the",
    "answer",
    "is",
    "42",
    "x",
    "=",
    "(3+4)*5",
    "print(x)",
    "Paris",
    "naïve",
    "日本",
    "—",
    "ok.",
    "<b>",
    "def",
    "f(a):",
    "return",
    "a",
    "+",
    "1",
    "{'k':",
    "[1,",
    "2]}",
    "search",
    "\\boxed{7}",
    "#",
]
END = "<|im_end|>"


def _text(rng: random.Random) -> str:
    """Random content that starts with a non-space (the model's first token follows the role header)."""
    parts = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
    seps = [rng.choice([" ", " ", "\n", "  ", "\n\n"]) for _ in parts]
    return "".join(w + s for w, s in zip(parts, seps, strict=True)).rstrip()


def _conversation(rng: random.Random):
    """(prompt messages, [(model content, ends with EOS, environment messages)])."""
    prompt = [{"role": "user", "content": _text(rng)}]
    if rng.random() < 0.5:
        prompt.insert(0, {"role": "system", "content": _text(rng)})
    turns = []
    for _ in range(rng.randint(1, 4)):
        env = [{"role": rng.choice(["tool", "user", "tool"]), "content": _text(rng)} for _ in range(rng.randint(1, 2))]
        turns.append((_text(rng) + rng.choice(["", "</search>", "</code>"]), rng.random() < 0.7, env))
    return prompt, turns


def _spans(mask):
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        if not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


@pytest.mark.parametrize("seed", range(6))
def test_tokens_equal_the_templates_tokenisation_and_masks_cover_model_turns(seed, smollm2_path):
    from slime.utils.processing_utils import load_tokenizer

    tok = load_tokenizer(smollm2_path)
    rng = random.Random(seed)
    for _ in range(25):
        prompt, turns = _conversation(rng)
        sample = Sample(prompt=prompt)
        traj = ChatTrajectory(sample, tok)
        assert sample.tokens == tok.apply_chat_template(
            prompt, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        messages, model_texts = list(prompt), []
        for content, eos, env in turns:
            ids = tok.encode(content + (END if eos else ""), add_special_tokens=False)
            traj.add_model_tokens(ids, [-0.5] * len(ids))
            model_texts.append(content + (END if eos else ""))
            traj.add_messages(env)
            messages += [{"role": "assistant", "content": content}, *env]
        whole = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert sample.tokens == whole, (prompt, turns)
        sample.check_alignment()
        spans = _spans(sample.loss_mask)
        response = sample.tokens[sample.prompt_length :]
        assert [tok.decode(response[a:b]) for a, b in spans] == model_texts
        assert all(sample.rollout_log_probs[i] == (-0.5 if m else 0.0) for i, m in enumerate(sample.loss_mask))

        # a conversation that ends on the model's turn: the template only adds its end-of-turn whitespace
        ids = tok.encode("final answer" + END, add_special_tokens=False)
        traj.add_model_tokens(ids, [-0.1] * len(ids))
        closed = tok.apply_chat_template(
            [*messages, {"role": "assistant", "content": "final answer"}], tokenize=True, return_dict=False
        )
        assert closed[: len(sample.tokens)] == sample.tokens and not tok.decode(closed[len(sample.tokens) :]).strip()


def test_rendered_string_prompt_and_in_turn_text(smollm2_path):
    from slime.utils.processing_utils import load_tokenizer

    tok = load_tokenizer(smollm2_path)
    messages = [{"role": "user", "content": "What is the capital of Zorbia?"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    by_messages = ChatTrajectory(Sample(prompt=messages), tok)
    by_string = ChatTrajectory(Sample(prompt=rendered), tok)  # the data loader's --apply-chat-template output
    for traj in (by_messages, by_string):
        ids = tok.encode("<search>Zorbia capital</search>", add_special_tokens=False)
        traj.add_model_tokens(ids, [-1.0] * len(ids))
        traj.add_messages([{"role": "tool", "content": "Zorbia's capital is Quellin."}])
        info = traj.add_text("<information>more</information>")
        assert tok.decode(info) == "<information>more</information>"
    assert by_messages.sample.tokens == by_string.sample.tokens
    assert by_string.sample.loss_mask.count(1) == len(ids)


def test_a_template_that_rewrites_the_assistant_turn_is_named(smollm2_path):
    from slime.utils.processing_utils import load_tokenizer

    tok = copy.deepcopy(load_tokenizer(smollm2_path))
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    traj = ChatTrajectory(Sample(prompt=[{"role": "user", "content": "hi"}]), tok)
    traj.add_model_tokens(tok.encode("  padded answer  ", add_special_tokens=False))
    with pytest.raises(ValueError, match="does not render the conversation as a continuation.*add_text"):
        traj.add_messages([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="follows a model turn"):
        ChatTrajectory(Sample(prompt=[{"role": "user", "content": "hi"}]), tok).add_messages([])


def test_environment_tokens_beyond_the_budget_are_cut(smollm2_path):
    from slime.utils.processing_utils import load_tokenizer

    tok = load_tokenizer(smollm2_path)
    traj = ChatTrajectory(Sample(prompt=[{"role": "user", "content": "q"}]), tok, max_response_len=12)
    traj.add_model_tokens(tok.encode("<search>a b</search>", add_special_tokens=False))
    traj.add_messages([{"role": "tool", "content": "a long result " * 20}])
    assert traj.sample.response_length == 12 and traj.sample.status == Sample.Status.TRUNCATED
    assert traj.remaining({"max_new_tokens": 100}) == 0
    traj.sample.check_alignment()


def test_a_resumed_partial_sample_starts_its_conversation_over(smollm2_path):
    from slime.utils.processing_utils import load_tokenizer

    tok = load_tokenizer(smollm2_path)
    prompt = [{"role": "user", "content": "q"}]
    sample = Sample(prompt=prompt)
    ChatTrajectory(sample, tok).add_model_tokens(tok.encode("half an ans", add_special_tokens=False))
    ChatTrajectory(sample, tok)
    assert sample.response_length == 0 and sample.metadata["restarted"] == 1
    assert sample.tokens == tok.apply_chat_template(
        prompt, tokenize=True, add_generation_prompt=True, return_dict=False
    )
