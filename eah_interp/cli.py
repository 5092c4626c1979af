"""The ``eah-interp`` console script: ``scan``, ``generate``, ``demo``, ``eval`` and ``merge``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from eah_interp.distributed import SCAN_CHECKPOINT  # the file in ``scan --out`` that makes a scan resumable

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()

ModelOpt = Annotated[str, typer.Option(help="'organism' (bundled, trained) or 'tiny-llava' (random weights).")]


#: Set by the app-level ``--device`` option.
_OPTIONS = {"device": None}


@app.callback()
def _options(
    device: Annotated[str | None, typer.Option(help="run the model on this torch device (cuda, cuda:1, mps); default: CPU")] = None,
) -> None:
    """Options shared by every command (give them before the command: eah-interp --device cuda scan)."""
    _OPTIONS["device"] = device


def _load(name: str, *, fallback: bool = False):
    import torch

    from eah_interp.models import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        bundle = load_model(name, device=_OPTIONS["device"])
    except (FileNotFoundError, ImportError) as err:
        if not fallback:
            raise
        console.print(f"[bold red]Could not load {name!r}: {err}[/]")
        console.print("[bold red]Falling back to a tiny RANDOM-WEIGHT LLaVA: the captions below are noise.[/]")
        bundle = load_model("tiny-llava", device=_OPTIONS["device"])
    console.print(f"[bold]model:[/] {bundle.note}")
    return bundle


def _preset(name: str, layers: list[int] | None, threshold: float | None, default_threshold: float):
    from eah_interp.config import EAHConfig

    overrides: dict = {"threshold": default_threshold if threshold is None else threshold}
    if layers:
        overrides["layers"] = tuple(layers)
    if name == "paper":
        return EAHConfig.paper(**overrides)
    if name == "reference":
        return EAHConfig.reference(**overrides)
    if Path(name).is_file():
        return EAHConfig.from_json(Path(name).read_text())
    raise typer.BadParameter(f"--preset must be 'paper', 'reference' or a JSON EAHConfig file; got {name!r}.")


def _images(n_scenes: int, photos: list[str], images: list[Path]):
    from PIL import Image

    from eah_interp.scenes import iter_scenes

    items = [(f"scene {s.seed}", s.image, s.kinds) for s in iter_scenes("heldout", n_scenes, pair_strength=0.9)]
    if photos:
        from skimage import data as skdata

        items += [(f"skimage.{p}", Image.fromarray(getattr(skdata, p)()), None) for p in photos]
    items += [(str(p), Image.open(p).convert("RGB"), None) for p in images]
    return items


def _write_scan(stats, out: Path, title: str) -> Table:
    out.mkdir(parents=True, exist_ok=True)
    frame = stats.to_frame()
    frame.to_csv(out / "head_stats.csv", index=False)
    fig = stats.plot_heatmap("sink_density", title=title)
    fig.savefig(out / "sink_density.png", dpi=120)
    per_layer = frame.groupby("layer")[["sink_density_mean", "image_mass_text_mean"]].mean()
    table = Table(title="vision-sink density per layer (mean over heads) and its densest head")
    for col in ("layer", "mean sink density", "densest head", "its density", "text→image mass"):
        table.add_column(col, justify="right")
    for layer, row in per_layer.iterrows():
        top = stats.rank("sink_density", layer=int(layer)).iloc[0]
        table.add_row(
            str(layer), f"{row.sink_density_mean:.3f}", str(int(top['head'])),
            f"{top.sink_density_mean:.3f}", f"{row.image_mass_text_mean:.3f}",
        )
    return table


@app.command()
def scan(
    model: ModelOpt = "organism",
    n: Annotated[int, typer.Option("--n", "-n", help="held-out scenes to scan (-n under torchrun, which takes --n for its own --nnodes)")] = 32,
    threshold: Annotated[float | None, typer.Option(help="sink threshold (default: the model's)")] = None,
    normalise: Annotated[str, typer.Option(help="'causal', 'official' or 'rows' (bidirectional image attention: Gemma 3, PaliGemma)")] = "causal",
    batch_size: int = 8,
    out: Annotated[Path, typer.Option(help="output folder (rerun to resume)")] = Path("runs/scan"),
    resume: Annotated[bool, typer.Option(
        "--resume/--no-resume",
        help=f"continue from OUT/{SCAN_CHECKPOINT} (same model, threshold, normalisation; default), or start over",
    )] = True,
    shard: Annotated[str | None, typer.Option(
        help="i/N: scan only items i, i+N, ... (a separate job; combine with `eah-interp merge`). Under torchrun "
             "or accelerate launch the ranks shard the data by themselves.",
    )] = None,
) -> None:
    """Head statistics over scene images → head_stats.csv + sink_density.png, and a per-layer table. Resumable.

    After every batch the running statistics and the names of the counted images are written, atomically,
    to OUT/scan_checkpoint.safetensors. Rerunning the same command continues from there without counting
    an image twice; a larger --n extends a finished scan. A checkpoint written with another model,
    threshold or normalisation is an error (use another --out, or --no-resume to discard it).

    Launched with torchrun / accelerate launch, each rank scans its shard (item index modulo world size)
    into its own checkpoint and rank 0 merges them; with --shard i/N, run `eah-interp merge` afterwards.
    """
    from eah_interp import distributed
    from eah_interp.errors import ConfigError

    try:
        part = distributed.Shard.resolve(shard)
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="--shard") from err
    bundle = _load(model)
    try:
        result = distributed.scan(bundle, _scene_items(n), out, shard=part, dataset="held-out scenes, pair strength 0.9",
                                  threshold=threshold, normalise=normalise, batch_size=batch_size, resume=resume,
                                  log=console.print)
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="--out") from err
    if not result.merged:
        merge_hint = "rank 0 merges" if part.launched else f"when all {part.count} shards are done: eah-interp merge {out}"
        console.print(f"shard {part} done: {result.checkpoint} ({merge_hint})")
        return
    console.print(_write_scan(result.stats, out, f"{bundle.name}: sink density (n={n})"))
    console.print(f"wrote {out / 'head_stats.csv'} and {out / 'sink_density.png'} (checkpoint: {out / SCAN_CHECKPOINT})")


def _scene_items(n: int) -> list:
    """``(name, loader)`` of the first ``n`` held-out scenes, as `_images` names them (a shard renders only its own)."""
    from functools import partial

    from eah_interp.scenes import make_scene, scene_seeds

    def image(seed: int):
        return make_scene(seed, pair_strength=0.9).image

    return [(f"scene {seed}", partial(image, seed)) for seed in scene_seeds("heldout", n)]


@app.command()
def generate(
    model: ModelOpt = "organism",
    use_eah: Annotated[bool, typer.Option("--eah/--no-eah", help="also caption with EAH, side by side")] = True,
    preset: Annotated[str, typer.Option(help="'paper', 'reference' or a JSON EAHConfig file")] = "paper",
    layers: Annotated[list[int] | None, typer.Option("--layer", help="layer(s) to edit (repeatable)")] = None,
    threshold: float | None = None,
    scenes: Annotated[int, typer.Option(help="held-out scenes to caption")] = 4,
    photo: Annotated[list[str] | None, typer.Option(help="skimage.data photo names, e.g. chelsea")] = None,
    image: Annotated[list[Path] | None, typer.Option(help="image files")] = None,
    max_new_tokens: int = 30,
) -> None:
    """Caption images, baseline and (with --eah) EAH side by side."""
    _caption_table(_load(model), preset, layers, threshold, scenes, photo or [], image or [], max_new_tokens, use_eah)


def _caption_table(bundle, preset, layers, threshold, scenes, photos, images, max_new_tokens, use_eah):
    from eah_interp.experiments import generate_texts

    items = _images(scenes, photos, images)
    imgs = [img for _, img, _ in items]
    prompts = [bundle.caption_prompt] * len(items)
    base, _ = generate_texts(bundle, prompts, imgs, max_new_tokens=max_new_tokens, desc="baseline")
    table = Table(title="captions" + (" (baseline vs EAH)" if use_eah else ""), show_lines=True)
    for col in ["image", "objects", "baseline"] + (["EAH", "source head"] if use_eah else []):
        table.add_column(col)
    rows = [[name, ", ".join(sorted(k)) if k else "?", b] for (name, _, k), b in zip(items, base, strict=True)]
    edited = None
    if use_eah:
        config = _preset(preset, layers, threshold, bundle.threshold)
        console.print(f"[bold]EAH:[/] {config.describe()}")
        edited, heads = generate_texts(bundle, prompts, imgs, config=config, max_new_tokens=max_new_tokens, desc="EAH")
        for row, e, h in zip(rows, edited, heads, strict=True):
            row += [e, ", ".join(map(str, h))]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    return items, base, edited


@app.command()
def demo(
    model: ModelOpt = "organism",
    n_scan: Annotated[int, typer.Option(help="scenes for the head scan")] = 16,
    n_captions: Annotated[int, typer.Option(help="scenes to caption")] = 8,
    out: Path = Path("runs/demo"),
) -> None:
    """The main job: head scan + EAH vs baseline captions (with CHAIR) on the bundled model."""
    from eah_interp.experiments import scan_images

    bundle = _load(model, fallback=True)
    items = _images(n_scan, [], [])
    stats = scan_images(bundle, [img for _, img, _ in items])
    console.print(_write_scan(stats, out, f"{bundle.name}: sink density (n={n_scan})"))
    items, base, edited = _caption_table(bundle, "paper", None, None, n_captions, ["chelsea"], [], 30, True)
    summary: dict = {"model": bundle.name, "trained": bundle.trained, "n_captions": n_captions}
    try:
        from eah_interp.metrics import chair_scores
    except ImportError:  # pragma: no cover - metrics always ship; guard for partial installs
        chair_scores = None
    if chair_scores is not None and bundle.trained:
        truth = [k for _, _, k in items if k is not None]
        for name, caps in (("baseline", base), ("eah", edited)):
            scores = chair_scores(caps[: len(truth)], truth, vocabulary="scenes")
            summary[name] = {k: round(scores[k], 4) for k in ("chair_s", "chair_i", "recall", "length")}
        console.print(f"CHAIR on {len(truth)} scenes: baseline {summary['baseline']}  EAH {summary['eah']}")
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    console.print(f"wrote {out}/head_stats.csv, sink_density.png, demo_summary.json")


@app.command("eval")
def evaluate(
    model: ModelOpt = "organism",
    n: Annotated[int, typer.Option(help="held-out scenes")] = 100,
    out: Annotated[Path, typer.Option(help="output folder (rerun to resume)")] = Path("runs/eval"),
    beams: Annotated[int, typer.Option(help="beam width of the beam-search arms (1 = none)")] = 3,
    conditions: Annotated[list[str] | None, typer.Option("--condition", help="run only these arms")] = None,
    tasks: Annotated[list[str] | None, typer.Option("--task", help="caption and/or pope")] = None,
    batch_size: int = 8,
    bootstrap: Annotated[int, typer.Option(help="bootstrap resamples")] = 5000,
    scan: Annotated[int, typer.Option(help="also scan head statistics over this many scenes (0 = no)")] = 0,
) -> None:
    """Baseline vs EAH (paper, reference) vs controls: CHAIR, POPE, logit probe, paired CIs. Resumable."""
    from eah_interp.evaluation import (
        default_conditions,
        load_items,
        run_experiment,
        source_head_table,
        write_report,
    )
    from eah_interp.experiments import scan_images

    bundle = _load(model)
    arms = default_conditions(bundle, beams=beams)
    if conditions:
        unknown = set(conditions) - {c.name for c in arms}
        if unknown:
            raise typer.BadParameter(f"unknown condition(s) {sorted(unknown)}; known: {[c.name for c in arms]}")
        arms = [c for c in arms if c.name in conditions or c.name == "baseline"]
    items = run_experiment(bundle, out, n=n, conditions=arms, batch_size=batch_size, tasks=tasks or ("caption", "pope"))
    summary = write_report(items, out, title=f"EAH on {bundle.name}: baseline vs EAH vs controls", n_resamples=bootstrap)
    extra = ["## Source heads chosen (prompt forward, per scene)", "", source_head_table(load_items(items)), ""]
    if scan:
        stats = scan_images(bundle, [img for _, img, _ in _images(scan, [], [])])
        console.print(_write_scan(stats, out, f"{bundle.name}: sink density (n={scan})"))
        frame = stats.to_frame()
        per_layer = frame.groupby("layer").agg(
            sink_density=("sink_density_mean", "mean"), max_head_density=("sink_density_mean", "max"),
            image_mass_text=("image_mass_text_mean", "mean"), entropy=("entropy_mean", "mean"),
        )
        extra += [f"## Head statistics over {scan} held-out scenes (threshold {stats.threshold})", "",
                  "![sink density](sink_density.png)", "", per_layer.round(3).to_markdown(), ""]
    with (out / "report.md").open("a") as f:
        f.write("\n".join(extra) + "\n")
    console.print((out / "report.md").read_text())
    console.print(f"wrote {out}/items.jsonl, results.csv, report.md, effects.png ({len(summary)} rows)")


@app.command()
def merge(
    paths: Annotated[list[Path], typer.Argument(help="the --out folders (or checkpoint files) of the shard runs")],
    out: Annotated[Path | None, typer.Option(help="where the merged results go (default: the first folder)")] = None,
    partial: Annotated[bool, typer.Option(help="merge unfinished shards too (a look at the progress)")] = False,
    items: Annotated[list[Path] | None, typer.Option(help="also merge these items.jsonl files into OUT/items.jsonl")] = None,
) -> None:
    """Merge the shards of a scan (`scan --shard i/N` jobs) → head_stats.csv, sink_density.png, merged checkpoint.

    Checks that the shards are of one scan, that all N are there and finished, and that no image was
    counted twice; the merged statistics equal a 1-process scan's (counts exactly, means and stds to
    rounding). With --items, evaluation items are merged by key (no duplicates, sorted).
    """
    from eah_interp import distributed
    from eah_interp.errors import ConfigError

    target = out or (paths[0] if paths[0].is_dir() else paths[0].parent)
    try:
        if items:
            console.print(f"wrote {distributed.merge_items(items, target / 'items.jsonl')}")
            if not any(p.is_file() or distributed.find_shards([p], missing_ok=True) for p in paths):
                return  # items only
        stats = distributed.merge_scan(paths, target, partial=partial)
    except ConfigError as err:
        raise typer.BadParameter(str(err)) from err
    n = max(stats.n_examples(layer) for layer in stats.layers) if stats.layers else 0
    console.print(_write_scan(stats, target, f"{stats.model or 'model'}: sink density (n={n})"))
    console.print(f"merged {n} images into {target / 'head_stats.csv'} (checkpoint: {target / SCAN_CHECKPOINT})")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
