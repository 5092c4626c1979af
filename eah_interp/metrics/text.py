"""Text handling for CHAIR's reference protocol: a word tokenizer with character spans and a singulariser.

Both reproduce, without their dependencies, what the original CHAIR code (Rohrbach et al. 2018,
``utils/chair.py`` in github.com/LisaAnne/Hallucination) calls: ``nltk.word_tokenize`` on the lower-cased
caption (as nltk 3.9+ does it; the nltk 3.2.5 the original pinned differs in rare cases) and
``pattern.en.singularize`` (Pattern 3.6) on every token. Only what can change which words CHAIR sees is
reproduced; every rule and every known difference is listed in docs/metrics.md, and
benchmarks/chair_reference_check.py compares both with the original code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Token:
    """One word of a caption: its text and its character span ``text[start:end]``."""

    text: str
    start: int
    end: int


# ---------------------------------------------------------------------------------------------- tokenizer
# nltk.word_tokenize = Punkt sentence splitting, then the Treebank-style word tokenizer on each sentence.
# The word tokenizer only *inserts* boundaries, so each rule below is written as "where does a boundary go"
# on one whitespace-separated chunk, and every token keeps its exact span in the caption.

_ALWAYS_SPLIT = re.compile(r"[;@#$%&?!*\[\](){}<>\"`«»“”‘’„\u2012-\u2015]|\.{2,}|--|''")
"""Characters the word tokenizer always makes tokens of their own (runs of dots and '--' as one token)."""

_COMMA_COLON = re.compile(r"[:,](?!\d)")
"""',' and ':' split unless a digit follows (``1,000`` and ``10:30`` stay one token)."""

_CLITIC = re.compile(r"(?<=[^'])('s|'m|'d|'ll|'re|'ve|n't|')$", re.IGNORECASE)
"""Word endings split off as their own token ("dog's" -> "dog" "'s", "dogs'" -> "dogs" "'"); a trailing
"'" goes first, so "man's'" -> "man" "'s" "'"."""

_LEADING_QUOTE = re.compile(r"^'(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)", re.IGNORECASE)
"""An opening single quote before a word ("'dog" -> "'" "dog")."""

_FINAL_PERIOD = re.compile(r"(?<=[^.])\.[\])}>\"'»”’]*$")
"""A sentence's final period: after a non-period, followed only by closing brackets and quotes."""

_AFTER_TOKEN = set("?!)\";}]*:@'({[‘’“”«»")
"""A '.', '?' or '!' directly followed by one of these may end a Punkt sentence inside a chunk."""

_CLOSER_CHUNK = re.compile(r"[\"')\]}‘’“”«»]+")
"""A chunk of closing quotes/brackets alone, which Punkt moves onto the end of the sentence before it."""

_AFTER_FINAL_PERIOD = set("])}>'»”’ ")
"""What may stand between a sentence's final period and its end for the period to split off."""


def _sentence_periods(chunk: str, followed: bool, closers_ok: bool) -> list[int]:
    """Indices of the periods in ``chunk`` that end a sentence and so split off.

    Punkt ends a sentence at the *last* '.', '?' or '!' of a chunk that is directly followed by one of
    `_AFTER_TOKEN` or, at the chunk's end, by more text (``followed``); closing quotes and brackets right
    after it stay in that sentence, and the period splits off only if those are ``) ] } > ' " ’ ” »``. At
    the end of the text the word tokenizer splits the final period as well. Only a period after a
    non-period splits ("..." is one token).
    """
    periods = []
    ends = [i for i, c in enumerate(chunk) if c in ".?!" and (
        (i + 1 < len(chunk) and chunk[i + 1] in _AFTER_TOKEN) or (i == len(chunk) - 1 and followed))]
    if ends and chunk[ends[-1]] == "." and ends[-1] > 0 and chunk[ends[-1] - 1] != ".":
        i = ends[-1]
        rest = chunk[i + 1:]
        if not rest:
            ok = closers_ok
        elif _CLOSER_CHUNK.fullmatch(rest):  # closers Punkt keeps in this sentence: only these let the period go
            ok = set(rest) <= _AFTER_FINAL_PERIOD | {'"'}
        else:
            ok = True
        if ok:
            periods.append(i)
    if not followed:
        final = _FINAL_PERIOD.search(chunk)
        if final and final.start() not in periods:
            periods.append(final.start())
    return periods


def _split_chunk(chunk: str, offset: int, followed: bool, closers_ok: bool) -> list[Token]:
    """Tokens of one whitespace-free chunk starting at ``offset`` in the caption.

    Args:
        chunk: the chunk.
        offset: its position in the caption.
        followed: whether more text follows the chunk.
        closers_ok: whether a period ending the chunk may split (see `word_tokenize`).
    """
    cuts = [(m.start(), m.end()) for m in _ALWAYS_SPLIT.finditer(chunk)]
    cuts += [(m.start(), m.end()) for m in _COMMA_COLON.finditer(chunk)]
    cuts += [(i, i + 1) for i in _sentence_periods(chunk, followed, closers_ok)]
    pieces: list[tuple[int, int]] = []
    position = 0
    for start, end in sorted(cuts):
        if start < position:  # overlapping alternatives: keep the first
            continue
        if start > position:
            pieces.append((position, start))
        pieces.append((start, end))
        position = end
    if position < len(chunk):
        pieces.append((position, len(chunk)))

    tokens: list[Token] = []
    for s, e in pieces:
        text = chunk[s:e]
        lead = _LEADING_QUOTE.search(text)
        if lead:
            tokens.append(Token("'", offset + s, offset + s + 1))
            s, text = s + 1, text[1:]
        ending: list[Token] = []
        if len(text) > 1 and text.endswith("'") and text[-2] != "'":
            ending.append(Token("'", offset + e - 1, offset + e))
            e, text = e - 1, text[:-1]
        clitic = _CLITIC.search(text)
        if clitic and clitic.start() > 0:
            cut = s + clitic.start()
            tokens.append(Token(chunk[s:cut], offset + s, offset + cut))
            tokens.append(Token(chunk[cut:e], offset + cut, offset + e))
        elif text:
            tokens.append(Token(text, offset + s, offset + e))
        tokens.extend(ending)
    return tokens


def word_tokenize(text: str) -> list[Token]:
    """Split a caption into words as ``nltk.word_tokenize`` would, keeping each word's character span.

    Rules (nltk's Treebank-style tokenizer, applied per sentence): whitespace separates; ``; @ # $ % & ? !
    * ( ) [ ] { } < >``, double quotes, dashes and runs of dots are tokens of their own; ``,`` and ``:``
    split unless a digit follows; clitics ``'s 'm 'd 'll 're 've n't`` and a trailing ``'`` split off; a
    sentence's final period splits off. Hyphens, slashes and periods inside a word do not split
    ("hot-dog", "cat/dog", "dog.the" are single tokens).

    Sentence ends (Punkt) decide which periods split: the period ending a chunk that more text follows,
    or a period directly followed by ``?!)";}]*:@'({[`` or a curly quote, when it is the chunk's last
    such '.', '?' or '!' (`_sentence_periods`); a chunk of closing quotes/brackets alone after it joins
    that sentence, and then only ``) ] } ’ ” »`` after spaces let the period split. Punkt would keep the
    period of an abbreviation it knows ("mr.", "st.", "e.g.") attached; none of those is a CHAIR word, so
    this never changes which objects are found. Tokens are not lower-cased.

    Args:
        text: the caption.

    Returns:
        the tokens, each with ``text[start:end] == token.text``.
    """
    chunks = list(re.finditer(r"\S+", text))
    tokens: list[Token] = []
    for i, chunk in enumerate(chunks):
        closers_ok = True
        following = chunks[i + 1] if i + 1 < len(chunks) else None
        if following and _CLOSER_CHUNK.fullmatch(following.group()):
            # Punkt joins the closers to this sentence; the period splits only if spaces and ' ) ] } ’ ” »
            # alone follow it (a '"' after a space has become an opening quote, and a newline is not a space).
            between = text[chunk.end(): following.start()] + following.group()
            closers_ok = set(between) <= _AFTER_FINAL_PERIOD
        tokens.extend(_split_chunk(chunk.group(), chunk.start(), following is not None, closers_ok))
    return tokens


# ---------------------------------------------------------------------------------------------- singulariser
# Pattern 3.6's ``pattern.en.singularize`` (github.com/clips/pattern, pattern/text/en/inflect.py), the
# version pinned in LisaAnne/Hallucination's requirements.txt. Its word lists are reproduced as data; the
# order of the checks below is the order Pattern applies them, quirks included (see docs/metrics.md).

_UNINFLECTED = frozenset(
    "bison debris headquarters pincers trout bream diabetes herpes pliers tuna breeches djinn high-jinks "
    "proceedings whiting britches eland homework rabies wildebeest carp elk innings salmon chassis flounder "
    "jackanapes scissors christmas gallows mackerel series clippers georgia measles shears cod graffiti mews "
    "species contretemps mumps swine corps news swiss".split()
)
_UNCOUNTABLE = frozenset(
    "advice equipment happiness luggage news software bread fruit information mathematics progress "
    "understanding butter furniture ketchup mayonnaise research water cheese garbage knowledge meat rice "
    "electricity gravel love mustard sand".split()
)
_IE_WORDS = (  # "-ies" plurals of these are kept as they are; "^pie", "^tie" are literal in Pattern: never match
    "alergie cutie hoagie newbie softie veggie auntie doggie hottie nightie sortie weenie beanie eyrie indie "
    "oldie stoolie yuppie birdie freebie junkie ^pie sweetie zombie bogie goonie laddie pixie techie bombie "
    "groupie laramie quickie ^tie collie hankie lingerie reverie toughie cookie hippie meanie rookie valkyrie"
).split()
_IRREGULAR = {
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef", "brethren": "brother",
    "children": "child", "corpora": "corpus", "corpuses": "corpus", "ephemerides": "ephemeris", "feet": "foot",
    "ganglia": "ganglion", "geese": "goose", "genera": "genus", "genii": "genie", "graffiti": "graffito",
    "helves": "helve", "kine": "cow", "leaves": "leaf", "loaves": "loaf", "men": "man", "mongooses": "mongoose",
    "monies": "money", "moves": "move", "mythoi": "mythos", "numena": "numen", "occipita": "occiput",
    "octopodes": "octopus", "opera": "opus", "opuses": "opus", "our": "my", "oxen": "ox", "penes": "penis",
    "penises": "penis", "people": "person", "sexes": "sex", "soliloquies": "soliloquy", "teeth": "tooth",
    "testes": "testis", "trilbys": "trilby", "turves": "turf", "zoa": "zoon",
}
_PREPOSITIONS = frozenset(
    "about before during of till above behind except off to across below for on under after beneath from onto "
    "until among beside in out unto around besides into over upon at between near since with athwart betwixt "
    "beyond but by".split()
)
_RULES: list[tuple[str, str]] = [  # (suffix pattern, replacement), first match wins
    (r"(.)ae$", r"\1a"), (r"(.)itis$", r"\1itis"), (r"(.)eaux$", r"\1eau"), (r"(quiz)zes$", r"\1"),
    (r"(matr)ices$", r"\1ix"), (r"(ap|vert|ind)ices$", r"\1ex"), (r"^(ox)en", r"\1"), (r"(alias|status)es$", r"\1"),
    (r"([octop|vir])i$", r"\1us"),  # a character class in Pattern: "taxi"-like words ending in [ciooprtv|]i
    (r"(cris|ax|test)es$", r"\1is"), (r"(shoe)s$", r"\1"), (r"(o)es$", r"\1"), (r"(bus)es$", r"\1"),
    (r"([m|l])ice$", r"\1ouse"), (r"(x|ch|ss|sh)es$", r"\1"), (r"(m)ovies$", r"\1ovie"), (r"(.)ombies$", r"\1ombie"),
    (r"(s)eries$", r"\1eries"), (r"([^aeiouy]|qu)ies$", r"\1y"),
    (r"([aeo]l)ves$", r"\1f"), (r"([^d]ea)ves$", r"\1f"), (r"arves$", "arf"), (r"erves$", "erve"),
    (r"([nlw]i)ves$", r"\1fe"), (r"([lr])ves$", r"\1f"), (r"([aeo])ves$", r"\1ve"), (r"(sive)s$", r"\1"),
    (r"(tive)s$", r"\1"), (r"(hive)s$", r"\1"), (r"([^f])ves$", r"\1fe"),
    (r"(^analy)ses$", r"\1sis"),
    (r"((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
    (r"(.)opses$", r"\1opsis"), (r"(.)yses$", r"\1ysis"), (r"(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"), (r"(.)oses$", r"\1osis"),
    (r"([ti])a$", r"\1um"), (r"(n)ews$", r"\1ews"), (r"s$", ""),
]
_COMPILED_RULES = [(re.compile(pattern, re.IGNORECASE), replacement) for pattern, replacement in _RULES]


def _expand(match: re.Match, replacement: str) -> str:
    """``match.expand`` where a group that did not take part counts as empty (as Pattern does)."""
    return re.sub(r"\\(\d)", lambda g: match.group(int(g.group(1))) or "", replacement)


def singularize(word: str) -> str:
    """The singular Pattern 3.6's ``singularize`` gives for a noun, quirks included.

    The checks run in Pattern's order: a hyphenated compound whose second part is a preposition
    ("mothers-in-law") singularises its first part; a trailing apostrophe becomes "'s"; a word that is
    the *end* of an uninflected or uncountable word stays as it is ("a" stays "a" because of "tuna"); the
    "-ies" plural of a listed "-ie" word is returned unchanged ("doggies", "collies"); an irregular plural ending
    is replaced ("women" -> "woman", "people" -> "person"); otherwise the first matching suffix rule
    applies, the last of which drops any final "s" -- so "bus" -> "bu", "glass" -> "glas", "tennis" ->
    "tenni", "sports" -> "sport" and "ties" -> "ty" (the "-ies" rule).

    Args:
        word: one token (already lower-cased by the caller in CHAIR).

    Returns:
        its singular as Pattern computes it.
    """
    if "-" in word:
        parts = word.split("-")
        if len(parts) > 1 and parts[1] in _PREPOSITIONS:
            return singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):
        return singularize(word[:-1]) + "'s"
    lower = word.lower()
    if any(x.endswith(lower) for x in _UNINFLECTED) or any(x.endswith(lower) for x in _UNCOUNTABLE):
        return word
    for ie_word in _IE_WORDS:
        if lower.endswith(ie_word + "s"):
            return lower
    for plural, singular in _IRREGULAR.items():
        if lower.endswith(plural):
            return re.sub("(?i)" + plural + "$", singular, word)
    for pattern, replacement in _COMPILED_RULES:
        match = pattern.search(word)
        if match:
            return word[: match.start()] + _expand(match, replacement) + word[match.end():]
    return word
