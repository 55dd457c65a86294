"""A generated encyclopedia of invented countries (so no model has memorised it) and a BM25 index over it.

Each country gets one passage stating its capital, currency, river and founding year, written in one of a few
phrasings; questions ask for one fact, so answering needs the right passage.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter

SYLLABLES = [
    "zor",
    "bi",
    "quel",
    "lin",
    "dra",
    "mo",
    "vek",
    "tha",
    "lu",
    "sar",
    "ni",
    "kor",
    "ven",
    "pa",
    "tris",
    "al",
    "gon",
    "ri",
    "mu",
    "bel",
    "xa",
    "do",
    "fen",
    "ka",
    "os",
    "tu",
    "wel",
    "ry",
    "ish",
    "em",
]
TEMPLATES = [
    "{c} is a country whose capital is {capital}. Its currency is the {currency}, the {river} river crosses it, "
    "and it was founded in {year}.",
    "Founded in {year}, {c} pays in the {currency}. The capital city of {c} is {capital}, on the {river} river.",
    "The {river} flows through {c}. {c}'s capital is {capital}; its money is the {currency}; founding year {year}.",
]
QUESTIONS = {
    "capital": "What is the capital of {c}?",
    "currency": "What is the currency of {c}?",
    "river": "Which river crosses {c}?",
    "year": "In which year was {c} founded?",
}


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def build_corpus(n: int = 300, seed: int = 0) -> tuple[list[str], list[dict]]:
    """(passages, facts): one passage per invented country and its facts {country, capital, currency, river, year}."""
    rng, seen, passages, facts = random.Random(seed), set(), [], []
    while len(facts) < n:
        c = _name(rng, 3)
        if c in seen:
            continue
        seen.add(c)
        f = {
            "country": c,
            "capital": _name(rng, 2),
            "currency": _name(rng, 2).lower(),
            "river": _name(rng, 2),
            "year": str(rng.randint(1100, 1990)),
        }
        passages.append(rng.choice(TEMPLATES).format(c=c, **{k: v for k, v in f.items() if k != "country"}))
        facts.append(f)
    return passages, facts


def questions(facts: list[dict], seed: int = 0) -> list[dict]:
    """One question row per fact, in slime's JSONL layout: {prompt, label}."""
    rng = random.Random(seed)
    rows = []
    for f in facts:
        kind = rng.choice(sorted(QUESTIONS))
        rows.append({"prompt": QUESTIONS[kind].format(c=f["country"]), "label": f[kind]})
    return rows


def _terms(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower().replace("'s", ""))


class BM25:
    """Okapi BM25 (k1 1.2, b 0.75) over whitespace-and-punctuation terms."""

    def __init__(self, docs: list[str], k1: float = 1.2, b: float = 0.75):
        self.docs, self.k1, self.b = docs, k1, b
        self.tfs = [Counter(_terms(d)) for d in docs]
        self.lens = [sum(tf.values()) for tf in self.tfs]
        self.avg = sum(self.lens) / len(docs)
        df = Counter(t for tf in self.tfs for t in tf)
        self.idf = {t: math.log(1 + (len(docs) - n + 0.5) / (n + 0.5)) for t, n in df.items()}

    def search(self, query: str, k: int = 3) -> list[tuple[float, str]]:
        terms = _terms(query)
        scores = []
        for i, tf in enumerate(self.tfs):
            norm = self.k1 * (1 - self.b + self.b * self.lens[i] / self.avg)
            s = sum(self.idf.get(t, 0.0) * tf[t] * (self.k1 + 1) / (tf[t] + norm) for t in terms if t in tf)
            scores.append((s, i))
        best = sorted(scores, reverse=True)[:k]
        return [(s, self.docs[i]) for s, i in best if s > 0]
