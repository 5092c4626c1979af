"""Cost of `patching.sweep(checkpoint=...)` and of resuming, on the bundled organism (CPU).

Times the same restricted sweep (resid, 10 layers, 4 position groups, 2 directions = 80 patches, a
batch of 4 prompts) without a checkpoint and with one, alternating, ``--pairs`` times; then a resume of
a finished checkpoint (nothing to compute). Prints the medians and the ratio with / without.

    OMP_NUM_THREADS=1 python benchmarks/sweep_checkpoint.py --pairs 3 --out docs/results/sweep_checkpoint.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from nnsight import NNsight

    from eah_interp import EAH
    from eah_interp.models import load_model
    from eah_interp.patching import LogitDiff, NNsightPatcher, sweep
    from eah_interp.scenes import make_scene, question_for

    torch.manual_seed(0)
    bundle = load_model("organism")
    scenes = [make_scene(100000001 + i) for i in range(4)]
    prompts = [bundle.yes_no_prompt(question_for(o)) for o in ("triangle", "heart", "tree", "star")]
    inputs = bundle.processor(prompts, [s.image for s in scenes])
    metric = LogitDiff(yes=tuple(bundle.yes_ids), no=tuple(bundle.no_ids))
    patcher = NNsightPatcher(NNsight(bundle.model), inputs, EAH.paper(threshold=bundle.threshold))
    options = dict(sites=("resid",), layers=range(args.layers), positions=("system", "image", "question", "last"),
                   progress=False)
    sweep(patcher, metric, **options)  # warm-up (donors cached, kernels built)
    plain, saved = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            t = time.perf_counter()
            want = sweep(patcher, metric, **options)
            plain.append(time.perf_counter() - t)
            path = Path(tmp) / f"sweep{pair}.jsonl"
            t = time.perf_counter()
            got = sweep(patcher, metric, checkpoint=path, **options)
            saved.append(time.perf_counter() - t)
            assert got.equals(want), "a checkpointed sweep differs from the plain one"
        t = time.perf_counter()
        resumed = sweep(patcher, metric, checkpoint=path, **options)
        resume_s = time.perf_counter() - t
        assert resumed.equals(want)
    result = {
        "patches": len(want), "batch": len(prompts), "pairs": args.pairs,
        "plain_s": plain, "checkpoint_s": saved, "resume_finished_s": resume_s,
        "ratio_of_medians": statistics.median(saved) / statistics.median(plain),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
