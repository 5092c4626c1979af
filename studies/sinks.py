"""Sinks or local patterns? The organism's heads against the null models, and the two sink definitions.

``python -m studies sinks --out docs/results/sinks`` (``--quick``: 4 scenes) writes into ``out``:

* ``density_curve_layer<L>.png`` / ``curves.json``: sink density against the threshold for every head of
  layer ``L`` (default 1, EAH's layer), with the densities a pure previous-token and a pure uniform
  pattern get on the same prompts (`eah_interp.sinks.null_densities`); per head, each null on its own:
  the previous-token share of the image rows (`eah_interp.sinks.previous_token_share`), the distance of
  the head's attention rows from each null pattern (`null_pattern_distance`, total variation) and of its
  density curve from each null's curve (`curve_distance`), next to the density-based flag
  (`explained_by_null`, which saturates where both nulls have density 1);
* ``head_stats.csv`` / ``layer_sinks_tau<tau>.csv``: a `HeadStats` scan at the organism's threshold
  with the null flag per head and, per layer, the massive-activation sinks (dimensions found by
  `eah_interp.sinks.massive_dims`) and their overlap with EAH's column-mass sinks, at VAR's
  ``tau = 20`` and at ``tau`` scaled to the organism's hidden size (``20 * sqrt(576 / 4096)``: the largest
  RMS-normalised entry a ``d``-dimensional state can hold is ``sqrt(d)``; our rule, not VAR's);
* ``report.md``: what was found.

Each part is written when it is done and skipped when its output exists (a rerun resumes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch


def main(out: Path, *, quick: bool = False, n: int | None = None, layer: int = 1, threshold: float | None = None,
         batch_size: int = 8, progress: bool | None = None) -> Path:
    """Run the study into ``out`` and return the path of its ``report.md`` (``progress``: the scans' bars; None =
    tqdm's rule, on only when stderr is a terminal)."""
    from eah_interp import hf
    from eah_interp.data import scene_dataset
    from eah_interp.experiments import scan_images
    from eah_interp.head_stats import HeadStats
    from eah_interp.models import image_token_ids, load_model
    from eah_interp.sinks import (
        DEFAULT_THRESHOLDS,
        curve_distance,
        density_curve,
        massive_activation_sinks,
        massive_dims,
        null_densities,
        null_pattern_distance,
        plot_density_curve,
        previous_token_share,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = n if n is not None else (4 if quick else 32)
    bundle = load_model("organism")
    threshold = bundle.threshold if threshold is None else threshold
    model = bundle.model
    items = list(scene_dataset(n))
    images = [item.load_image() for item in items]
    ids = [item.id for item in items]
    batches = [(images[i : i + batch_size], ids[i : i + batch_size]) for i in range(0, n, batch_size)]

    # 1. density curves of one layer against the nulls; per head, each null on its own
    curves_path = out / "curves.json"
    if not curves_path.exists() or "pattern_distance" not in json.loads(curves_path.read_text()):
        curves, nulls, rows = [], {"previous": [], "uniform": []}, 0
        shares, pattern, curve_gap = [], {k: [] for k in nulls}, {k: [] for k in nulls}
        with hf.record_attention(model, [layer], keep_patterns=True) as rec, torch.no_grad():
            for chunk, _ in batches:
                model(**bundle.encode([bundle.caption_prompt] * len(chunk), chunk), use_cache=False)
                probs, layout = rec.patterns[layer].pop(), rec.layouts[-1]
                curve = density_curve(probs, layout, DEFAULT_THRESHOLDS)  # [T, b, heads]
                curves.append(curve.sum(1))  # [T, heads]
                for kind, value in null_densities(layout, DEFAULT_THRESHOLDS).items():  # [T, b]
                    nulls[kind].append(value.sum(1))
                    pattern[kind].append(null_pattern_distance(probs, layout, kind).sum(0))
                    curve_gap[kind].append(curve_distance(curve, value[:, :, None]).sum(0))
                shares.append(previous_token_share(probs, layout).sum(0))
                rows += len(chunk)
        result = {
            "layer": layer, "threshold": threshold, "n": rows, "thresholds": list(DEFAULT_THRESHOLDS),
            "density": (torch.stack(curves).sum(0) / rows).tolist(),
            "nulls": {k: (torch.stack(v).sum(0) / rows).tolist() for k, v in nulls.items()},
            "previous_share": (torch.stack(shares).sum(0) / rows).tolist(),
            "pattern_distance": {k: (torch.stack(v).sum(0) / rows).tolist() for k, v in pattern.items()},
            "curve_distance": {k: (torch.stack(v).sum(0) / rows).tolist() for k, v in curve_gap.items()},
        }
        curves_path.write_text(json.dumps(result, indent=1))
    curves = json.loads(curves_path.read_text())
    figure = out / f"density_curve_layer{layer}.png"
    if not figure.exists():
        fig = plot_density_curve(
            curves["thresholds"], torch.tensor(curves["density"]), {k: torch.tensor(v) for k, v in curves["nulls"].items()},
            threshold=threshold, title=f"organism layer {layer}: sink density vs threshold ({curves['n']} scenes, causal)",
        )
        fig.savefig(figure, dpi=120)

    # 2. the scan: null flags per head, massive-activation sinks and their overlap per layer
    dims_path = out / "sink_dims.json"
    if not dims_path.exists():
        with torch.no_grad():
            first = bundle.encode([bundle.caption_prompt] * len(batches[0][0]), batches[0][0])
            hidden = model(**first, output_hidden_states=True, use_cache=False).hidden_states
        pooled = torch.cat(hidden[1:-1])  # the decoder layers' inputs after the embeddings
        dims = massive_dims(pooled, top=2)
        image = torch.isin(first["input_ids"], torch.tensor(image_token_ids(model)))
        real = first["attention_mask"].bool()
        above = {}
        for tau in (20.0, round(20.0 * math.sqrt(pooled.shape[-1] / 4096), 2)):
            hits = torch.stack([massive_activation_sinks(h, dims, tau) for h in hidden[1:-1]])  # [layers, b, seq]
            above[f"{tau:g}"] = {"image": int((hits & image).sum()), "text": int((hits & real & ~image).sum()),
                                 "image_tokens": int(image.sum()) * hits.shape[0],
                                 "text_tokens": int((real & ~image).sum()) * hits.shape[0]}
        dims_path.write_text(json.dumps({"dims": list(dims), "hidden_size": pooled.shape[-1], "above": above,
                                         "image_per_row": int(image.sum(-1).max())}))
    found = json.loads(dims_path.read_text())
    dims, hidden_size = tuple(found["dims"]), found["hidden_size"]
    taus = (20.0, round(20.0 * math.sqrt(hidden_size / 4096), 2))
    scans: dict[float, Any] = {}
    for tau in taus:
        path = out / f"scan_tau{tau:g}.safetensors"
        if path.exists():
            scans[tau] = HeadStats.load(path)
            continue
        stats = HeadStats(threshold=threshold, model=bundle.name, keep_examples=True, sink_dims=dims, tau=tau)
        scan_images(bundle, images, stats=stats, ids=ids, batch_size=batch_size, progress=progress)
        stats.save(path)
        scans[tau] = stats
        stats.layer_frame().to_csv(out / f"layer_sinks_tau{tau:g}.csv", index=False)
    stats = scans[taus[0]]
    stats.to_frame().to_csv(out / "head_stats.csv", index=False)
    report = out / "report.md"
    report.write_text(_report(curves, stats, scans, taus, found, threshold, layer))
    return report


def _report(curves: dict, stats: Any, scans: dict, taus: tuple, found: dict, threshold: float, layer: int) -> str:
    dims = found["dims"]
    t = curves["thresholds"]
    at = min(range(len(t)), key=lambda i: abs(math.log(t[i]) - math.log(threshold)))
    frame = stats.to_frame()
    this = frame[frame.layer == layer].set_index("head")
    lines = [
        "# Sinks or local patterns? (organism)",
        "",
        f"Regenerate: `python -m studies sinks --out docs/results/sinks`. {curves['n']} held-out scenes, caption "
        f"prompt, causal normaliser, threshold {threshold:g}.",
        "",
        f"## Layer {layer}: density against the null models",
        "",
        f"![density vs threshold](density_curve_layer{layer}.png)",
        "",
        f"At threshold {t[at]:.3g} (the grid point nearest {threshold:g}) a pure previous-token pattern has density "
        f"{curves['nulls']['previous'][at]:.2f} and a pure uniform pattern {curves['nulls']['uniform'][at]:.2f} on these "
        "prompts: below about `1 / (rows after the image)` every image token of a local pattern counts as a sink.",
        "",
        "Each null on its own, per head (image rows, mean over scenes): the previous-token share "
        "(`sinks.previous_token_share`); the distance of the head's attention rows from each null pattern "
        "(`sinks.null_pattern_distance`: mean total variation, 0 = the head is that pattern, 1 = no overlap); the "
        "distance of its density-vs-threshold curve from each null's (`sinks.curve_distance`: mean absolute gap over "
        "the 41 log-spaced thresholds); and the density-based flag (`sinks.explained_by_null`, either null, share of "
        "scenes), which cannot tell the two nulls or a local head from a broad one where both nulls have density 1.",
        "",
        "| head | previous-token share | pattern distance: previous null | pattern distance: uniform null | "
        "curve distance: previous null | curve distance: uniform null | density at the threshold | "
        "density flag (share of scenes) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for head, share in enumerate(curves["previous_share"]):
        pd_, cd = curves["pattern_distance"], curves["curve_distance"]
        lines.append(f"| {head} | {share:.2f} | {pd_['previous'][head]:.2f} | {pd_['uniform'][head]:.2f} | "
                     f"{cd['previous'][head]:.3f} | {cd['uniform'][head]:.3f} | "
                     f"{this.loc[head, 'sink_density_mean']:.2f} | {this.loc[head, 'explained_by_null_mean']:.2f} |")
    flagged = stats.explained_heads()
    lines += [
        "",
        f"Heads flagged in at least half the scenes, all layers ({len(flagged)} of {len(frame)}): "
        + (", ".join(f"L{int(r.layer)}H{int(r['head'])}" for _, r in flagged.iterrows()) or "none") + ".",
        "",
        "## Two sink definitions",
        "",
        f"Massive-activation dimensions (`massive_dims` over the decoder layers' inputs of the first batch): {list(dims)}. "
        "Per layer, mean per scene: image tokens that are an EAH sink in at least one head, image tokens with a "
        "massive activation, both, and the pooled Jaccard.",
        "",
        "| layer | EAH sinks | " + " | ".join(f"massive (tau {tau:g}) | both | Jaccard" for tau in taus) + " |",
        "| --- | --- | " + " | ".join("--- | --- | ---" for _ in taus) + " |",
    ]
    frames = {tau: scans[tau].layer_frame().set_index("layer") for tau in taus}
    for la in frames[taus[0]].index:
        cells = [f"{frames[taus[0]].loc[la, 'eah_sinks_mean']:.1f}"]
        for tau in taus:
            row = frames[tau].loc[la]
            jac = "n/a" if math.isnan(row.pooled_jaccard) else f"{row.pooled_jaccard:.2f}"
            cells += [f"{row.massive_sinks_mean:.1f}", f"{row.both_mean:.1f}", jac]
        lines.append(f"| {la} | " + " | ".join(cells) + " |")
    # what the numbers say, computed from them
    share = curves["previous_share"]
    most_local = max(range(len(share)), key=share.__getitem__)
    flagged_here = [int(h) for h in flagged[flagged.layer == layer]["head"]]
    lowest = this["sink_density_mean"].idxmin()
    lines += ["", "## Reading", ""]
    lines.append(
        f"* Layer {layer}: head {most_local} puts {share[most_local]:.2f} of its image rows' attention on the previous "
        f"token; its density at {threshold:g} is {this.loc[most_local, 'sink_density_mean']:.2f} and it is flagged in "
        f"{this.loc[most_local, 'explained_by_null_mean']:.2f} of the scenes. Heads of layer {layer} flagged in at least "
        f"half the scenes: {flagged_here or 'none'}."
    )
    dist = curves["pattern_distance"]
    near = {kind: min(range(len(share)), key=dist[kind].__getitem__) for kind in dist}
    dense_not_local = [h for h in range(len(share)) if this.loc[h, "explained_by_null_mean"] > 0
                       and dist["previous"][h] > 0.5]
    lines.append(
        "* Each null on its own: closest to the previous-token pattern is head "
        f"{near['previous']} (pattern distance {dist['previous'][near['previous']]:.2f}); closest to the uniform "
        f"pattern is head {near['uniform']} ({dist['uniform'][near['uniform']]:.2f}). "
        + (f"The density flag also marks heads {dense_not_local} on some scenes although they are far from a "
           "previous-token pattern (distance > 0.5): at this threshold it marks density, not locality."
           if dense_not_local else "No head far from the previous-token pattern (distance > 0.5) is density-flagged.")
    )
    def crossing(values: list[float], level: float) -> float:
        return next((t[i] for i in range(len(t)) if values[i] < level), t[-1])

    spans = [crossing([row[h] for row in curves["density"]], 0.1) / crossing([row[h] for row in curves["density"]], 0.9)
             for h in range(len(share))]
    lines.append(
        f"* The other heads of layer {layer} are not flagged, but no head has a low plateau either: every head's mean "
        f"density falls from above 0.9 to below 0.1 within a factor of {max(spans):.0f} of the threshold, like the "
        f"nulls (lowest density at {threshold:g}: head {lowest}, {this.loc[lowest, 'sink_density_mean']:.2f}). On these "
        "prompts the threshold decides how many image tokens count as sinks more than any head does: read the "
        "figure, not one threshold."
        if this["sink_density_mean"].min() > 0.3 else
        f"* Some heads of layer {layer} keep a low density at {threshold:g} (lowest: head {lowest}, "
        f"{this.loc[lowest, 'sink_density_mean']:.2f})."
    )
    for tau in taus:
        seen = found.get("above", {}).get(f"{tau:g}")
        frame_tau = frames[tau]
        none = [int(la) for la in frame_tau.index if frame_tau.loc[la, "massive_sinks_mean"] == 0]
        text = (f"* tau {tau:g}: in the first batch, {seen['text']} of {seen['text_tokens']} text-token states and "
                f"{seen['image']} of {seen['image_tokens']} image-token states (decoder-layer inputs) are above tau. "
                if seen else f"* tau {tau:g}: ")
        saturated = [int(la) for la in frame_tau.index if frame_tau.loc[la, "massive_sinks_mean"] >= 0.95 * found.get("image_per_row", 0)]
        if len(none) >= len(frame_tau) // 2:
            text += (f"No image token has a massive activation in {len(none)} of {len(frame_tau)} layers: on the "
                     "organism EAH's sinks are not VAR's sink tokens at this tau.")
        elif len(saturated) >= len(frame_tau) // 2:
            text += (f"Nearly every image token is 'massive' in {len(saturated)} of {len(frame_tau)} layers: this tau "
                     "does not separate tokens, and the Jaccard only follows EAH's count.")
        lines.append(text)
    lines.append("")
    return "\n".join(lines)
