"""Check CHAIR's reference protocol against the original code, caption by caption.

Two steps, because the original needs nltk and Pattern and this package needs torch:

1. ``python benchmarks/chair_reference_check.py original --hallucination PATH`` runs the original CHAIR code
   (``utils/chair.py`` of a checkout of github.com/LisaAnne/Hallucination, which reads its
   ``data/synonyms.txt``) on ``tests/data/chair_reference/captions.json`` and writes what it finds for every
   caption to ``tests/data/chair_reference/expected.json``. It needs ``nltk`` (with the ``punkt`` or
   ``punkt_tab`` English model) and ``pattern.en.singularize`` importable. The original is Python 2 code;
   its ``print`` statements are turned into calls in memory, nothing else is changed. No COCO files are
   read: each item's ground truth is its ``instances`` (mapped through the original's synonym dict) plus
   the objects the original finds in its ``references``, exactly as its ``get_annotations`` does.
2. ``python benchmarks/chair_reference_check.py compare`` runs ``chair_scores(..., protocol="reference")``
   on the same captions and reports, per caption, whether the mentions (words and objects) and the
   hallucinations agree with ``expected.json``; differing captions are printed, then CHAIR_s/CHAIR_i of the
   original, of the reference protocol and of the strict protocol on these captions.
3. ``python benchmarks/chair_reference_check.py fuzz --hallucination PATH -n 2000 --seed 0`` (an environment
   with nltk, Pattern *and* this package) feeds random captions made of published words, inflections and
   punctuation to both and prints every caption whose object words differ.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import types
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "chair_reference"


def load_original(root: Path) -> types.ModuleType:
    """The original ``utils/chair.py`` as a module (Python 2 prints made calls; ``from misc import *`` dropped)."""
    source = (root / "utils" / "chair.py").read_text()
    source = re.sub(r"^(\s*)print (.+)$", r"\1print(\2)", source, flags=re.MULTILINE)
    source = source.replace("from misc import *", "import os")
    module = types.ModuleType("original_chair")
    module.__file__ = str(root / "utils" / "chair.py")
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 - the user's own checkout
    return module


def run_original(root: Path, wordnet_nouns: bool = False) -> list[dict]:
    """What the original finds in each fixture caption, and its hallucinations against the fixture's truth.

    With ``wordnet_nouns`` Pattern's singulariser is swapped for nltk's WordNet lemmatizer on every word as
    a noun: an estimate of the OPERA-derived copies, which lemmatize after POS tagging.
    """
    items = json.loads((DATA / "captions.json").read_text())["items"]
    original = load_original(root)
    if wordnet_nouns:
        from nltk.stem import WordNetLemmatizer

        original.singularize = WordNetLemmatizer().lemmatize
    cwd = os.getcwd()
    os.chdir(root)  # the original reads data/synonyms.txt relative to the working directory
    try:
        evaluator = original.CHAIR([item["id"] for item in items], "unused")
    finally:
        os.chdir(cwd)
    results = []
    for item in items:
        truth = {evaluator.inverse_synonym_dict[name] for name in item["instances"]}
        for reference in item["references"]:
            truth.update(evaluator.caption_to_words(reference)[1])
        words, node_words = evaluator.caption_to_words(item["caption"])[:2]
        hallucinated = [[w, n] for w, n in zip(words, node_words, strict=True) if n not in truth]
        results.append({"id": item["id"], "words": list(words), "objects": list(node_words),
                        "hallucinated": hallucinated, "truth": sorted(truth)})
    return results


def compare() -> int:
    """Print per-caption agreement of the reference protocol with ``expected.json``; returns the disagreements."""
    from eah_interp.metrics import chair_scores

    items = json.loads((DATA / "captions.json").read_text())["items"]
    expected = {e["id"]: e for e in json.loads((DATA / "expected.json").read_text())["captions"]}
    from eah_interp.metrics import load_coco_objects

    differ = 0
    for item in items:
        categories = [{"id": i, "name": name} for i, name in enumerate(sorted(set(item["instances"])))]
        instances = {"categories": categories, "images": [{"id": 0}],
                     "annotations": [{"image_id": 0, "category_id": c["id"]} for c in categories]}
        captions = {"annotations": [{"image_id": 0, "caption": ref} for ref in item["references"]]}
        truth = load_coco_objects(instances, captions)[0]
        scores = chair_scores([item["caption"]], [truth], vocabulary="coco", protocol="reference")
        ours = scores["per_caption"][0]
        words = [m["lemma"] for m in ours["mentions"] if m["counted"]]
        halluc = [[m["lemma"], m["object"]] for m in ours["mentions"] if m["hallucinated"]]
        exp = expected[item["id"]]
        same = (words, ours["mentioned"], halluc, sorted(truth)) == (exp["words"], exp["objects"], exp["hallucinated"], exp["truth"])
        if not same:
            differ += 1
            print(f"caption {item['id']} differs:\n  original: {exp['words']} -> {exp['hallucinated']} (truth {exp['truth']})"
                  f"\n  ours:     {words} -> {halluc} (truth {sorted(truth)})")
    n = len(items)
    print(f"{n - differ} of {n} captions agree with the original (mentions, objects, hallucinations, ground truth).")
    mentions = sum(len(e["words"]) for e in expected.values())
    halluc = sum(len(e["hallucinated"]) for e in expected.values())
    bad = sum(bool(e["hallucinated"]) for e in expected.values())
    print(f"original:  CHAIR_s {bad / n:.3f}  CHAIR_i {halluc / mentions:.3f}  ({halluc} of {mentions} mentions)")
    truths = [set(e["truth"]) for e in expected.values()]
    captions = [item["caption"] for item in items]
    for protocol in ("reference", "strict"):
        s = chair_scores(captions, truths, vocabulary="coco", protocol=protocol)
        print(f"{protocol + ':':<10} CHAIR_s {s['chair_s']:.3f}  CHAIR_i {s['chair_i']:.3f}  "
              f"({s['n_hallucinated']} of {s['n_mentions']} mentions)  recall {s['recall']:.3f}")
    return differ


def fuzz(root: Path, n: int, seed: int) -> int:
    """Random captions of published words, inflections and punctuation: does the reference protocol find
    exactly the original's words? Needs the original, nltk and Pattern importable next to this package."""
    import random

    import nltk

    from eah_interp.metrics import reference_mentions

    original = load_original(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        evaluator = original.CHAIR([], "unused")
    finally:
        os.chdir(cwd)
    vocab = sorted({w.strip() for w in evaluator.mscoco_objects} | {w for p in evaluator.double_word_dict for w in p.split()})
    filler = ("a an the is are on in with and or of no not isn't don't there two 1,000 3.5 man's it's very big red "
              "orange while , , , . . ; : ! ? ... ( ) \" ' - -- / & $ % # @ * ’ “ ” 's mr. st. e.g.").split()
    endings = ["", "", "", "s", "es", "'s", "s'", ".", ",", "-", "/dog", ".the", "ies", "en", "'", "?", ".?", ".)", ".:"]
    rng = random.Random(seed)
    differ = 0
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(3, 25)):
            word = rng.choice(vocab) + rng.choice(endings) if rng.random() < 0.5 else rng.choice(filler)
            parts.append(word.capitalize() if rng.random() < 0.2 else word)
        caption = "".join(p + rng.choice([" "] * 18 + ["", "\n"]) for p in parts)
        words, objects = evaluator.caption_to_words(caption)[:2]
        ours = [m for m in reference_mentions(caption) if m.counted]
        if (list(words), list(objects)) != ([m.lemma for m in ours], [m.object for m in ours]):
            differ += 1
            print(f"differs: {caption!r}\n  original {list(zip(words, objects, strict=True))}\n  ours     "
                  f"{[(m.lemma, m.object) for m in ours]}")
    print(f"{n - differ} of {n} random captions: the same object words as the original (nltk {nltk.__version__}).")
    return differ


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("original", help="run the original code and write expected.json")
    run.add_argument("--hallucination", type=Path, required=True, help="root of a LisaAnne/Hallucination checkout")
    run.add_argument("--note", default="", help="what was run (versions), stored in expected.json")
    run.add_argument("--wordnet-nouns", action="store_true", help="swap in WordNet noun lemmas (OPERA-like)")
    run.add_argument("--out", type=Path, default=DATA / "expected.json", help="where to write")
    sub.add_parser("compare", help="compare the reference protocol with expected.json")
    rand = sub.add_parser("fuzz", help="random captions through both (needs the original and this package)")
    rand.add_argument("--hallucination", type=Path, required=True, help="root of a LisaAnne/Hallucination checkout")
    rand.add_argument("-n", type=int, default=2000)
    rand.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "original":
        results = run_original(args.hallucination, args.wordnet_nouns)
        out = {"generated_by": "benchmarks/chair_reference_check.py original", "note": args.note, "captions": results}
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {len(results)} captions to {args.out}")
    elif args.command == "fuzz":
        sys.exit(1 if fuzz(args.hallucination, args.n, args.seed) else 0)
    else:
        sys.exit(1 if compare() else 0)


if __name__ == "__main__":
    main()
