"""`--rm-type ifeval`: every supported instruction, once followed and once missed, plus the data layouts."""

import asyncio
import json
from types import SimpleNamespace

import pytest

from slime.rollout.rm_hub import async_rm
from slime.rollout.rm_hub.ifeval import INSTRUCTIONS, count_sentences, follows
from slime.utils.types import Sample

CASES = [  # (instruction id, kwargs, response, followed)
    ("keywords:existence", {"keywords": ["river", "Stone"]}, "The stone sat by the River.", True),
    ("keywords:existence", {"keywords": ["river", "stone"]}, "The rock sat by the river.", False),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "Cat and cat.", True),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "cat cat", False),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "Badly done, badge.", True),  # whole words only
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "Not BAD at all.", False),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"}, "Zzz.", True),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "less than"}, "zzz", False),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}, "One. Two!", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}, "A. B? C! D", False),
    ("length_constraints:number_sentences", {"num_sentences": 1, "relation": "at least"}, "Pi is 3.14 roughly", True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "one two three four five", True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "one two three four five", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First part.\n***\nSecond part.", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\n\n***\nThird.", False),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
        "Start here.\n\nThen, go on.",
        True,
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
        "Start here.\n\nAnd then go on.",
        False,
    ),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at home.", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Body.\n\nP.S. see you", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Body, no PS here.", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n- two\n* three", False),
    ("detectable_format:constrained_response", {}, "Hmm. My answer is maybe.", True),
    ("detectable_format:constrained_response", {}, "My answer is perhaps.", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and ** **", False),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nintro\nSection 2\nbody",
        True,
    ),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nintro only",
        False,
    ),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', True),
    ("detectable_format:json_format", {}, "{'a': 1}", False),
    ("detectable_format:title", {}, "<<Ode to Rust>>\nlines", True),
    ("detectable_format:title", {}, "<< >> no title", False),
    ("combination:two_responses", {}, "Answer one.\n******\nAnswer two.", True),
    ("combination:two_responses", {}, "Same.\n******\nSame.", False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a haiku."}, "write a haiku. Leaves fall...", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a haiku."}, "Leaves fall. Write a haiku.", False),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?  ", True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions? Done.", False),
    ("startend:quotation", {}, '"Quoted whole."', True),
    ("startend:quotation", {}, '"Quoted" then not', False),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "at least"},
        "NASA and ESA fly.",
        True,
    ),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "less than"},
        "NASA and ESA fly.",
        False,
    ),
    ("change_case:english_capital", {}, "ALL CAPS, 100%!", True),
    ("change_case:english_capital", {}, "ALL CAPS but one", False),
    ("change_case:english_lowercase", {}, "all lower, 2 digits.", True),
    ("change_case:english_lowercase", {}, "all lower but I", False),
    ("punctuation:no_comma", {}, "No commas here.", True),
    ("punctuation:no_comma", {}, "One, comma.", False),
]


@pytest.mark.parametrize("instruction, kwargs, response, followed", CASES)
def test_instruction(instruction, kwargs, response, followed):
    assert follows(response, instruction, kwargs) is followed


def test_every_supported_instruction_has_a_followed_and_a_missed_case():
    assert {(c[0], c[3]) for c in CASES} == {(i, f) for i in INSTRUCTIONS for f in (True, False)}


def test_count_sentences():
    assert count_sentences("Mr. Smith paid $3.50. Then left!") == 3  # abbreviations count; documented
    assert count_sentences("") == 0 and count_sentences("no end") == 1


def _rm(sample: Sample) -> float:
    return asyncio.run(async_rm(SimpleNamespace(rm_type="ifeval", custom_rm_path=None), sample))


def test_ifeval_row_layouts_and_partial_credit():
    row = {  # the IFEval layout: nulls for the arguments an instruction does not take
        "instruction_id_list": ["punctuation:no_comma", "keywords:existence", "change_case:english_lowercase"],
        "kwargs": [{"keywords": None}, {"keywords": ["tea"], "num_words": None}, {}],
    }
    response = "i like tea. Very much"  # no comma, has tea, not all lowercase
    assert _rm(Sample(response=response, label=row)) == pytest.approx(2 / 3)
    assert _rm(Sample(response=response, label=json.dumps(row))) == pytest.approx(2 / 3)
    assert _rm(Sample(response=response, metadata=row)) == pytest.approx(2 / 3)


def test_ifeval_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="unsupported instruction 'language:response_language'"):
        _rm(Sample(response="x", label={"instruction_id_list": ["language:response_language"], "kwargs": [{}]}))
    with pytest.raises(ValueError, match="'keywords:existence' got arguments \\[\\]"):
        _rm(Sample(response="x", label={"instruction_id_list": ["keywords:existence"], "kwargs": [{}]}))
    with pytest.raises(ValueError, match="relation 'more than'"):
        follows("x", "length_constraints:number_words", {"num_words": 1, "relation": "more than"})
    with pytest.raises(ValueError, match="needs 'instruction_id_list'"):
        _rm(Sample(response="x", label="plain text"))
    with pytest.raises(ValueError, match="list of 2 dicts"):
        _rm(Sample(response="x", label={"instruction_id_list": ["a", "b"], "kwargs": [{}]}))
