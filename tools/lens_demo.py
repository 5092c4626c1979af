"""Organism demo of the logit lens and the presence probe, baseline vs EAH (numbers for docs/howto/explain.md).

    python tools/lens_demo.py --out runs/lens_demo --lens-scenes 4 --probe-scenes 300 --train 200

Writes into ``--out`` as it goes: ``lens.csv`` + ``lens_summary.csv`` + ``grid_*.png`` (logit lens on
held-out scenes), ``residuals_<condition>_<group>.pt`` (cached, so a rerun resumes), ``probe.csv``
(`eah_interp.probing.compare_probes` per position group) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402

from eah_interp import logit_lens, probing  # noqa: E402
from eah_interp.interventions import EAH  # noqa: E402
from eah_interp.models import ORGANISM_THRESHOLD, load_model  # noqa: E402
from eah_interp.scenes import iter_scenes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/lens_demo"))
    parser.add_argument("--lens-scenes", type=int, default=4)
    parser.add_argument("--probe-scenes", type=int, default=300)
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--start", type=int, default=5000, help="index of the first held-out scene")
    parser.add_argument("--n-boot", type=int, default=4000)
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    bundle = load_model("organism")
    conditions = {"baseline": None, "eah": [EAH.paper(threshold=ORGANISM_THRESHOLD)]}
    vocab = logit_lens.object_vocabulary(bundle.processor.tokenizer)
    summary: dict = {"conditions": {k: (None if v is None else [i.describe() for i in v]) for k, v in conditions.items()},
                     "vocabulary": vocab}

    # ---------------------------------------------------------------- logit lens on a few held-out scenes
    t0 = time.time()
    scenes = list(iter_scenes("heldout", args.lens_scenes, start=args.start))
    if (out / "confidence_summary.csv").exists():  # the lens stage is done: go on to the probe
        summary = json.loads((out / "summary.json").read_text())
        scenes = []
    frames, conf = [], []
    for i, scene in enumerate(scenes):
        inputs = bundle.encode([bundle.caption_prompt], [scene.image])
        f = logit_lens.image_token_lens(bundle.model, inputs, vocab, conditions)
        f["scene"] = scene.seed
        f["present"] = f["object"].isin(scene.kinds)
        frames.append(f)
        c = logit_lens.object_confidence(bundle.model, inputs, vocab, conditions, positions=("image", "last"))
        c["scene"] = scene.seed
        c["present"] = c["object"].isin(scene.kinds)
        conf.append(c)
        if i == 0:
            for cond in conditions:
                fig = logit_lens.plot_grid(f, [2, 10, 20, 29], condition=cond, image=scene.image)
                fig.savefig(out / f"grid_{cond}.png", dpi=110)
    import pandas as pd

    if scenes:
        _lens_tables(out, frames, conf, summary, scenes, t0)

    # ---------------------------------------------------------------- probe, baseline vs EAH
    t0 = time.time()
    probe_scenes = list(iter_scenes("heldout", args.probe_scenes, start=args.start + 1000))
    labels = probing.scene_labels(probe_scenes)
    results = []
    groups = ("image", "last")
    for cond, items in conditions.items():  # both groups from one forward per batch; cached for a rerun
        if not all((out / f"residuals_{cond}_{group}.pt").exists() for group in groups):
            collected = probing.collect_scenes(bundle, probe_scenes, positions=list(groups), interventions=items)
            for group in groups:
                torch.save(collected[group], out / f"residuals_{cond}_{group}.pt")
    for group in groups:
        feats = {cond: torch.load(out / f"residuals_{cond}_{group}.pt") for cond in conditions}
        frame = probing.compare_probes(feats, labels, range(args.train), range(args.train, len(probe_scenes)),
                                       n_boot=args.n_boot)
        frame.insert(0, "positions", group)
        results.append(frame)
        pd.concat(results).to_csv(out / "probe.csv", index=False)
        print(frame[["layer", "arm", "auroc", "auroc_low", "auroc_high", "d_auroc", "p_auroc_holm"]].to_string(), flush=True)
    from eah_interp.metrics.stats import holm

    combined = pd.concat(results, ignore_index=True)  # Holm over both position groups too
    adjusted = holm(list(combined["p_accuracy"]) + list(combined["p_auroc"]))
    combined["p_accuracy_holm"], combined["p_auroc_holm"] = adjusted[: len(combined)], adjusted[len(combined) :]
    combined.to_csv(out / "probe.csv", index=False)
    summary["probe_seconds"] = round(time.time() - t0, 1)
    summary["probe_scenes"] = [probe_scenes[0].seed, probe_scenes[-1].seed]
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


def _lens_tables(out: Path, frames: list, conf: list, summary: dict, scenes: list, t0: float) -> None:
    """Write the lens stage's tables and summary."""
    import pandas as pd

    lens = pd.concat(frames, ignore_index=True)
    lens.to_csv(out / "lens.csv", index=False)
    top = lens[lens["rank"] == 1]
    lens_summary = (
        top.groupby(["condition", "layer"])["present"].mean().rename("top_is_present").to_frame()
        .join(lens[lens.present].groupby(["condition", "layer"])["prob"].mean().rename("prob_present"))
        .join(lens[~lens.present].groupby(["condition", "layer"])["prob"].mean().rename("prob_absent"))
        .reset_index()
    )
    lens_summary.to_csv(out / "lens_summary.csv", index=False)
    confidence = pd.concat(conf, ignore_index=True)
    confidence.to_csv(out / "confidence.csv", index=False)
    conf_summary = confidence.groupby(["condition", "positions", "present", "layer"])["prob_mean"].mean().reset_index()
    conf_summary.to_csv(out / "confidence_summary.csv", index=False)
    summary["lens_seconds"] = round(time.time() - t0, 1)
    summary["lens_scenes"] = [s.seed for s in scenes]
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(lens_summary.to_string(), flush=True)


if __name__ == "__main__":
    main()
