"""Acceptance figures of the bundled organism on held-out scenes (greedy decoding).

    python -m eah_interp.models.organism.evaluate --n 200 --out docs/organism_eval.json

Measures: load time (cold: empty cache, GGUF conversion included; warm: cached), caption latency
(~30 new tokens), object recall and CHAIR on captions, yes/no accuracy on one present and one
absent kind per scene (absent kinds drawn at random, and, separately, the absent partner of a
present paired kind: the adversarial case), and a pass of real photos from scikit-image.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from eah_interp.metrics import chair_scores, pope_scores
from eah_interp.models.organism.loading import load_organism
from eah_interp.models.organism.processor import caption_prompt, yes_no_prompt
from eah_interp.scenes import KINDS, PAIRS, iter_scenes, question_for


def generate_batch(model, processor, prompts, images, max_new_tokens):
    inputs = processor(prompts, images)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--pair-strength", type=float, default=0.9)
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--cold-load", action="store_true", help="also time a load from an empty cache")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    result: dict = {"n_scenes": args.n, "pair_strength": args.pair_strength}

    if args.cold_load:
        with tempfile.TemporaryDirectory() as tmp:
            old = os.environ.get("EAH_INTERP_CACHE")
            os.environ["EAH_INTERP_CACHE"] = tmp
            t = time.perf_counter()
            load_organism(weights=args.weights)
            result["load_seconds_cold"] = round(time.perf_counter() - t, 2)
            if old is None:
                del os.environ["EAH_INTERP_CACHE"]
            else:
                os.environ["EAH_INTERP_CACHE"] = old
    t = time.perf_counter()
    model, processor = load_organism(weights=args.weights)
    result["load_seconds_warm"] = round(time.perf_counter() - t, 2)

    scenes = list(iter_scenes("heldout", args.n, pair_strength=args.pair_strength))
    # latency of one caption with exactly 30 new tokens
    inputs = processor(caption_prompt(), scenes[0].image)
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    result["caption_30_tokens_seconds"] = round(time.perf_counter() - t, 2)

    captions = []
    for i in tqdm(range(0, len(scenes), args.batch_size), desc="captions"):
        chunk = scenes[i : i + args.batch_size]
        captions += generate_batch(model, processor, [caption_prompt()] * len(chunk), [s.image for s in chunk], args.max_new_tokens)
    chair = chair_scores(captions, [s.kinds for s in scenes], vocabulary="scenes")
    result["captions"] = {k: chair[k] for k in ("chair_s", "chair_i", "recall", "length")}
    result["caption_examples"] = [
        {"truth": sorted(s.kinds), "caption": c} for s, c in list(zip(scenes, captions, strict=True))[:12]
    ]

    rng = random.Random(0)
    for mode in ("random", "adversarial"):
        questions, labels, images = [], [], []
        for s in scenes:
            absent = [k for k in KINDS if k not in s.kinds]
            if mode == "adversarial":
                partners = [PAIRS[k] for k in s.kinds if k in PAIRS and PAIRS[k] not in s.kinds]
                partners += [k for k, v in PAIRS.items() if v in s.kinds and k not in s.kinds]
                if not partners:
                    continue
                absent = partners
            for kind, label in ((rng.choice(sorted(s.kinds)), True), (rng.choice(absent), False)):
                questions.append(yes_no_prompt(question_for(kind)))
                labels.append(label)
                images.append(s.image)
        answers = []
        for i in tqdm(range(0, len(questions), args.batch_size), desc=f"yes/no ({mode})"):
            answers += generate_batch(model, processor, questions[i : i + args.batch_size], images[i : i + args.batch_size], 3)
        result[f"yes_no_{mode}"] = pope_scores(answers, labels)

    from skimage import data as skdata

    photos = {}
    for name in ("chelsea", "astronaut", "coffee"):
        photos[name] = generate_batch(model, processor, [caption_prompt()], [getattr(skdata, name)()], 20)[0]
    result["real_photos"] = photos

    text = json.dumps(result, indent=1, default=float)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
