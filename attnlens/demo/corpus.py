"""The demo's training text: English-like documents from built-in word lists and sentence templates, seeded.

Used by :mod:`attnlens.demo.train` (training text, and a held-out set with seed + 10000) and by ``attnlens scan``'s
offline demo data. Deterministic for a given :class:`random.Random`.
"""

from __future__ import annotations

import random

__all__ = ["EOT", "make_corpus", "make_document", "make_sentence"]

EOT = "<|endoftext|>"
"""The only special token of the demo tokenizer: ends every document."""


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


NAMES = _words(
    "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Leo Maria Nina Oscar Paul Quinn Rosa Sam "
    "Tom Uma Victor Wendy Xavier Yara Zoe Anna Ben Clara Daniel Ella Felix Hannah Ivan Julia Kevin Laura Max "
    "Olivia Peter"
)
DETS = _words("the a this that every some one my our their his her")
ADJS = _words(
    "quick lazy happy sad small large old young bright dark quiet loud green blue red yellow warm cold tall "
    "short strange gentle brave clever tired hungry busy lucky curious careful proud calm wild soft heavy "
    "light empty full early late simple famous hidden golden silver wooden broken ancient modern friendly"
)
NOUNS = _words(
    "dog cat bird fox horse rabbit teacher doctor farmer child student king queen river mountain forest city "
    "village garden house window door table chair book letter song story road bridge boat train car tree "
    "flower apple bread cup lamp key box ship island castle market school library kitchen field lake storm "
    "cloud star moon sun friend neighbor painter sailor baker soldier wizard dragon robot computer clock "
    "mirror coin map bell candle basket"
)
VERBS = _words(
    "saw found liked painted carried followed watched opened closed built visited helped called found "
    "chased cleaned wrote read lost kept sold bought moved pushed pulled fixed answered remembered "
    "forgot noticed touched borrowed admired ignored greeted met"
)
IVERBS = _words(
    "slept laughed waited smiled danced ran walked sang cried jumped arrived left stayed worked rested "
    "listened shouted whispered"
)
ADVS = _words("quickly slowly quietly happily suddenly carefully often never always again yesterday today soon")
PREPS = _words("near behind under above beside inside across along around through into from with without")
CONJS = _words("and but because while although when so")
PLACES = _words("Paris London Berlin Rome Madrid Vienna Oslo Lisbon Dublin Prague Athens Cairo Tokyo Lima Quito Seoul")
NUMS = _words("two three four five six seven eight nine ten twelve twenty many several few")

TEMPLATES = (
    "{Name} {verb} {det} {adj} {noun}.",
    "{Det} {adj} {noun} {verb} {det} {noun} {prep} the {noun}.",
    "{Name} {iverb} {adv} {prep} the {adj} {noun}.",
    "{Det} {noun} {iverb} {adv}.",
    "In {place}, {name} {verb} {num} {noun}s.",
    "{Name} and {name} {verb} the {noun} {conj} the {noun} {iverb}.",
    "{Det} {noun} was {adj} {conj} {det} {noun} was {adj}.",
    "{Name} said that the {noun} {verb} {det} {adj} {noun}.",
    "Yesterday {name} {iverb} {prep} the {noun} in {place}.",
    "There were {num} {adj} {noun}s {prep} the {noun}.",
    "Why did {name} {verb_base} the {adj} {noun}?",
    "{Name} {verb} {name}, {conj} {name} {iverb} {adv}.",
)
_BASE = {
    "saw": "see",
    "found": "find",
    "wrote": "write",
    "read": "read",
    "lost": "lose",
    "kept": "keep",
    "sold": "sell",
    "bought": "buy",
    "forgot": "forget",
    "met": "meet",
    "built": "build",
}


def _base(verb: str) -> str:
    if verb in _BASE:
        return _BASE[verb]
    if verb.endswith("ied"):
        return verb[:-3] + "y"
    if verb.endswith(("ed",)) and verb[:-1].endswith(("ase", "ose", "ove", "ire", "ete", "ure", "ice")):
        return verb[:-1]
    return verb[:-2] if verb.endswith("ed") else verb


def make_sentence(rng: random.Random) -> str:
    """Generate one English-like sentence from the built-in templates and word lists.

    Args:
        rng: Source of randomness.

    Returns:
        A sentence ending with punctuation.
    """
    template = rng.choice(TEMPLATES)
    pools = {
        "name": NAMES,
        "det": DETS,
        "adj": ADJS,
        "noun": NOUNS,
        "verb": VERBS,
        "iverb": IVERBS,
        "adv": ADVS,
        "prep": PREPS,
        "conj": CONJS,
        "place": PLACES,
        "num": NUMS,
    }
    out: list[str] = []
    pos = 0
    while True:
        start = template.find("{", pos)
        if start < 0:
            out.append(template[pos:])
            break
        end = template.index("}", start)
        out.append(template[pos:start])
        key = template[start + 1 : end]
        if key == "verb_base":
            word = _base(rng.choice(VERBS))
        else:
            word = rng.choice(pools[key.lower()])
            if key[0].isupper():
                word = word[0].upper() + word[1:]
        out.append(word)
        pos = end + 1
    return "".join(out)


def make_document(rng: random.Random, n_sentences: int) -> str:
    """Generate a short paragraph of sentences, sometimes repeating an earlier sentence verbatim.

    Args:
        rng: Source of randomness.
        n_sentences: Number of sentences in the document.

    Returns:
        The document text.
    """
    sentences: list[str] = []
    for _ in range(n_sentences):
        if sentences and rng.random() < 0.15:
            sentences.append(rng.choice(sentences))
        else:
            sentences.append(make_sentence(rng))
    return " ".join(sentences)


def make_corpus(rng: random.Random, n_docs: int) -> list[str]:
    """Generate a list of documents.

    Args:
        rng: Source of randomness.
        n_docs: Number of documents.

    Returns:
        The documents.
    """
    return [make_document(rng, rng.randint(3, 12)) for _ in range(n_docs)]
