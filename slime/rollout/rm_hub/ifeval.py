"""IFEval-style verifiable instructions (`--rm-type ifeval`): the reward is the fraction of a prompt's instructions
the response follows, each checked strictly on the response as written.

The instructions come from the sample's label (a dict, or its JSON text) or, when the label has none, its metadata:
`{"instruction_id_list": ["punctuation:no_comma", ...], "kwargs": [{}, ...]}` — the layout of the IFEval data, so
its rows load with `--label-key` or `--metadata-key`. `None` values inside a kwargs dict are ignored, as IFEval's
rows carry every argument with nulls. docs/rewards.md lists the supported ids with exactly what each checks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

RELATIONS = {"less than": lambda n, k: n < k, "at least": lambda n, k: n >= k}
_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def _compare(count: int, relation: str, target: int) -> bool:
    if relation not in RELATIONS:
        raise ValueError(f"relation {relation!r} is not one of {sorted(RELATIONS)}")
    return RELATIONS[relation](count, int(target))


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def count_sentences(text: str) -> int:
    """Runs of text ended by `.`, `!` or `?` before whitespace or the end, plus an unterminated tail."""
    parts = _SENTENCE_END.split(text)
    return sum(1 for p in parts if _WORD.search(p))


def _keyword_count(text: str, keyword: str) -> int:
    return len(re.findall(re.escape(keyword), text, flags=re.IGNORECASE))


def _existence(r: str, keywords: list[str]) -> bool:
    return all(_keyword_count(r, k) > 0 for k in keywords)


def _frequency(r: str, keyword: str, frequency: int, relation: str) -> bool:
    return _compare(_keyword_count(r, keyword), relation, frequency)


def _forbidden(r: str, forbidden_words: list[str]) -> bool:
    return not any(re.search(rf"\b{re.escape(w)}\b", r, flags=re.IGNORECASE) for w in forbidden_words)


def _letter_frequency(r: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _compare(r.lower().count(letter.lower()), let_relation, let_frequency)


def _number_sentences(r: str, num_sentences: int, relation: str) -> bool:
    return _compare(count_sentences(r), relation, num_sentences)


def _number_words(r: str, num_words: int, relation: str) -> bool:
    return _compare(len(_words(r)), relation, num_words)


def _number_paragraphs(r: str, num_paragraphs: int) -> bool:
    parts = [p.strip() for p in re.split(r"\s*\*\*\*\s*", r.strip())]
    return all(parts) and len(parts) == int(num_paragraphs)


def _nth_paragraph_first_word(r: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    parts = [p.strip() for p in re.split(r"\n\s*\n", r.strip()) if p.strip()]
    if len(parts) != int(num_paragraphs) or not 1 <= int(nth_paragraph) <= len(parts):
        return False
    words = _words(parts[int(nth_paragraph) - 1])
    return bool(words) and words[0].lower() == first_word.lower()


def _placeholders(r: str, num_placeholders: int) -> bool:
    return len(re.findall(r"\[[^\[\]]+\]", r)) >= int(num_placeholders)


def _postscript(r: str, postscript_marker: str) -> bool:
    return re.search(rf"^\s*{re.escape(postscript_marker)}", r, flags=re.IGNORECASE | re.MULTILINE) is not None


def _bullets(r: str, num_bullets: int) -> bool:
    return len(re.findall(r"^\s*[*-]\s+\S", r, flags=re.MULTILINE)) == int(num_bullets)


def _constrained(r: str) -> bool:
    return any(f"My answer is {w}." in r for w in ("yes", "no", "maybe"))


def _highlights(r: str, num_highlights: int) -> bool:
    marked = re.findall(r"\*\*([^*\n]+)\*\*", r) + re.findall(r"(?<!\*)\*([^*\n]+)\*(?!\*)", r)
    return sum(1 for m in marked if m.strip()) >= int(num_highlights)


def _sections(r: str, section_spliter: str, num_sections: int) -> bool:
    parts = re.split(rf"\s?{re.escape(section_spliter)}\s?\d+\s?", r)
    return len(parts) - 1 >= int(num_sections)


def _json(r: str) -> bool:
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", r.strip(), flags=re.IGNORECASE)
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _title(r: str) -> bool:
    return any(t.strip() for t in re.findall(r"<<([^\n]+?)>>", r))


def _two_responses(r: str) -> bool:
    parts = r.split("******")
    return len(parts) == 2 and all(p.strip() for p in parts) and parts[0].strip() != parts[1].strip()


def _repeat_prompt(r: str, prompt_to_repeat: str) -> bool:
    return r.strip().lower().startswith(prompt_to_repeat.strip().lower())


def _end_checker(r: str, end_phrase: str) -> bool:
    return r.strip().lower().endswith(end_phrase.strip().lower())


def _capital_words(r: str, capital_frequency: int, capital_relation: str) -> bool:
    return _compare(sum(1 for w in _words(r) if w.isupper()), capital_relation, capital_frequency)


def _all_capital(r: str) -> bool:
    return r.isupper()


def _all_lowercase(r: str) -> bool:
    return r.islower()


def _no_comma(r: str) -> bool:
    return "," not in r


def _quotation(r: str) -> bool:
    r = r.strip()
    return len(r) > 1 and r[0] == '"' and r[-1] == '"'


INSTRUCTIONS: dict[str, Callable[..., bool]] = {
    "keywords:existence": _existence,
    "keywords:frequency": _frequency,
    "keywords:forbidden_words": _forbidden,
    "keywords:letter_frequency": _letter_frequency,
    "length_constraints:number_sentences": _number_sentences,
    "length_constraints:number_words": _number_words,
    "length_constraints:number_paragraphs": _number_paragraphs,
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "detectable_content:number_placeholders": _placeholders,
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": _bullets,
    "detectable_format:constrained_response": _constrained,
    "detectable_format:number_highlighted_sections": _highlights,
    "detectable_format:multiple_sections": _sections,
    "detectable_format:json_format": _json,
    "detectable_format:title": _title,
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": _repeat_prompt,
    "startend:end_checker": _end_checker,
    "startend:quotation": _quotation,
    "change_case:capital_word_frequency": _capital_words,
    "change_case:english_capital": _all_capital,
    "change_case:english_lowercase": _all_lowercase,
    "punctuation:no_comma": _no_comma,
}


def instructions_of(label: Any, metadata: dict) -> tuple[list[str], list[dict]]:
    """(ids, kwargs) from the label (dict or JSON text), else from the metadata; raises naming what is missing."""
    source = label
    if isinstance(source, str):
        try:
            source = json.loads(source)
        except ValueError:
            source = None
    if not isinstance(source, dict) or "instruction_id_list" not in source:
        source = metadata
    ids = source.get("instruction_id_list") if isinstance(source, dict) else None
    if not isinstance(ids, list) or not ids:
        raise ValueError("ifeval needs 'instruction_id_list' (a non-empty list) in the label or the metadata")
    kwargs = source.get("kwargs") or [{} for _ in ids]
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise ValueError(f"ifeval: 'kwargs' must be a list of {len(ids)} dicts, one per instruction id")
    return ids, [{k: v for k, v in (kw or {}).items() if v is not None} for kw in kwargs]


def follows(response: str, instruction_id: str, kwargs: dict) -> bool:
    """Whether `response` follows one instruction; unknown ids and missing arguments raise with their names."""
    check = INSTRUCTIONS.get(instruction_id)
    if check is None:
        raise ValueError(f"ifeval: unsupported instruction {instruction_id!r}; supported: {sorted(INSTRUCTIONS)}")
    try:
        return bool(check(response, **kwargs))
    except TypeError as exc:
        raise ValueError(f"ifeval: instruction {instruction_id!r} got arguments {sorted(kwargs)}: {exc}") from exc


def ifeval_score(response: str, label: Any, metadata: dict) -> float:
    """Fraction of the instructions followed (1.0 = all of them)."""
    ids, kwargs = instructions_of(label, metadata)
    return sum(follows(response, i, kw) for i, kw in zip(ids, kwargs, strict=True)) / len(ids)
