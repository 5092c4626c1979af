"""The ``eah-interp`` console script: ``scan``, ``generate``, ``demo``, ``eval`` and ``merge`` (the studies behind docs/results.md run with ``python -m studies NAME`` from a checkout)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from eah_interp.distributed import SCAN_CHECKPOINT  # the file in ``scan --out`` that makes a scan resumable

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()

ModelOpt = Annotated[str, typer.Option(
    help="a registry name ('organism': bundled, trained; 'tiny-llava': random weights), a hub id or a local "
         "checkpoint folder (saved with save_pretrained)",
)]
ImagesOpt = Annotated[Path | None, typer.Option(
    "--images", help="a folder of images; with --coco-instances / --pope, the folder their file names refer to",
)]
CocoOpt = Annotated[Path | None, typer.Option(
    "--coco-instances", help="a COCO instances_*.json: ground-truth objects (CHAIR) of the images in --images",
)]
PopeOpt = Annotated[list[Path] | None, typer.Option(
    "--pope", help="a POPE question file (JSON lines: question_id, image, text, label); repeat for several splits",
)]
SeedOpt = Annotated[int, typer.Option(help="seed of the image draw (--n)")]
SPEC_HELP = ("an intervention spec: 'none', a preset ('eah', 'eah-reference', 'pai', 'var', ...; any intervention class "
             "by name), a call with keyword arguments ('pai(alpha=0.5)', 'eah(layers=[2])'), a '+' stack ('eah+pai') "
             "or a JSON file of to_dict() entries; EAH's threshold defaults to the model's")
BatchOpt = Annotated[int, typer.Option(min=1, help="images per forward pass")]
TokensOpt = Annotated[int, typer.Option(min=1, help="caption length budget (the CHAIR protocol of OPERA uses 512)")]
PromptOpt = Annotated[str | None, typer.Option(
    help="the caption request, wrapped by the model's chat template (default: the model's caption prompt)",
)]
DtypeOpt = Annotated[str | None, typer.Option(help="float32, bfloat16, float16 or auto (default: float32 for registry models, transformers' default for checkpoints)")]
DeviceOpt = Annotated[str | None, typer.Option(
    "--device", help="run the model on this torch device (cuda, cuda:1, mps); overrides the app-level --device",
)]
DeviceMapOpt = Annotated[str | None, typer.Option(
    "--device-map", help="accelerate's device_map, e.g. 'auto' (splits a large model over the GPUs and the CPU)",
)]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-remote-code/--no-trust-remote-code", help="allow a checkpoint's own Python code (only for sources you trust)",
)]


#: Set by the app-level ``--device`` option.
_OPTIONS = {"device": None}


def _n_option(default: str) -> typer.models.OptionInfo:
    return typer.Option("--n", "-n", min=1, help=f"images (drawn with --seed; default: {default})")


@contextlib.contextmanager
def _usage(hint: str | None = None) -> Iterator[None]:
    """What eah-interp refuses on purpose (an `EAHError`: a bad file, spec, layer) is one line and exit 2."""
    from eah_interp.errors import EAHError

    try:
        yield
    except EAHError as err:
        raise typer.BadParameter(f"{type(err).__name__}: {err}", param_hint=hint) from None


@app.callback()
def _options(
    device: Annotated[str | None, typer.Option(help="run the model on this torch device (cuda, cuda:1, mps); default: CPU")] = None,
) -> None:
    """Options shared by every command (give them before the command: eah-interp --device cuda scan)."""
    _OPTIONS["device"] = device


def _dtype(name: str | None):
    import torch

    if name is None or name == "auto":
        return name
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise typer.BadParameter(f"{name!r} is not a torch floating-point dtype; use float32, bfloat16 or float16.",
                                 param_hint="--dtype")
    return dtype


def _load(
    name: str, *, prompt: str | None = None, fallback: bool = False, dtype: str | None = None,
    device: str | None = None, device_map: str | None = None, trust_remote_code: bool = False,
):
    """`load_model` with the CLI's options; any `EAHError` while loading is a one-line usage error (exit 2).

    ``prompt``: the caption request instead of the model's own (wrapped by its chat template: scan, generate, eval).
    """
    import dataclasses

    import torch

    from eah_interp.errors import EAHError
    from eah_interp.models import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not sys.stderr.isatty():  # transformers' own bars (loading weights): no carriage returns in a log
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    options = {"dtype": _dtype(dtype), "device": device or _OPTIONS["device"], "device_map": device_map,
               "trust_remote_code": trust_remote_code or None}
    kwargs = {k: v for k, v in options.items() if v is not None}
    try:
        bundle = load_model(name, **kwargs)
    except EAHError as err:
        raise typer.BadParameter(str(err), param_hint="--model") from None
    except (FileNotFoundError, ImportError) as err:
        if not fallback:
            raise typer.BadParameter(f"could not load {name!r}: {err}", param_hint="--model") from None
        console.print(f"[bold red]Could not load {name!r}: {err}[/]")
        console.print("[bold red]Falling back to a tiny RANDOM-WEIGHT LLaVA: the captions below are noise.[/]")
        bundle = load_model("tiny-llava", device=_OPTIONS["device"])
    console.print(f"[bold]model:[/] {bundle.note}")
    return bundle if prompt is None else dataclasses.replace(bundle, caption_request=prompt)


def _dataset(
    *, images: Path | None, coco_instances: Path | None, pope: list[Path] | None, n: int | None, seed: int,
    default_scenes: int, generate_pope: bool = False,
):
    """The dataset the options name: POPE files, COCO instances, an image folder, or (none given) held-out scenes.

    A missing or malformed file raises `DataFormatError` naming the file, the line and the field.
    """
    from eah_interp import data

    if (pope or coco_instances) and images is None:
        raise typer.BadParameter(
            f"{'--pope' if pope else '--coco-instances'} needs --images DIR, the folder its image file names refer to.",
            param_hint="--images",
        )
    if pope:
        objects = None
        if coco_instances is not None:
            files, found = data.read_coco_instances(coco_instances)
            objects = {files[i]: frozenset(found[i]) for i in files}
        return data.read_pope(pope, images, objects=objects, n=n, seed=seed)  # type: ignore[arg-type]
    if coco_instances is not None:
        dataset = data.coco_instances(coco_instances, images, n=n, seed=seed)  # type: ignore[arg-type]
        return data.generate_pope(dataset, seed=seed) if generate_pope else dataset
    if generate_pope:
        raise typer.BadParameter("--generate-pope needs --coco-instances (ground-truth objects).",
                                 param_hint="--generate-pope")
    if images is not None:
        return data.image_folder(images, n=n, seed=seed)
    return data.scene_dataset(default_scenes if n is None else n)


def _images(n_scenes: int, photos: list[str], images: list[Path]) -> list:
    """Items of held-out scenes, skimage photos and image files (generate, demo), read when used."""
    from eah_interp.data import Item, scene_dataset

    items = list(scene_dataset(n_scenes)) if n_scenes else []
    if photos:
        from PIL import Image
        from skimage import data as skdata

        items += [Item(f"skimage.{p}", Image.fromarray(getattr(skdata, p)())) for p in photos]
    return items + [Item(str(p), p) for p in images]


def _write_scan(stats, out: Path, title: str) -> Table:
    """head_stats.csv + sink_density.png (+ layer_sinks.csv, examples.csv) in ``out``; returns the per-layer table.

    The table has, per layer: the mean sink density, the densest head, the text→image mass, the heads
    whose "sinks" a null pattern explains (in at least half the examples; `HeadStats.explained_heads`)
    and, when the scan compared sink definitions (``--sink-dims``), the mean number of massive-activation
    sinks among the image tokens and the overlap with EAH's (Jaccard of the summed counts).
    """
    out.mkdir(parents=True, exist_ok=True)
    frame = stats.to_frame()
    frame.to_csv(out / "head_stats.csv", index=False)
    import matplotlib.pyplot as plt

    fig = stats.plot_heatmap("sink_density", title=title)
    fig.savefig(out / "sink_density.png", dpi=120)
    plt.close(fig)  # a long-lived process (tests, notebooks) would keep every figure
    layers = stats.layer_frame().set_index("layer") if stats.sink_dims else None
    if layers is not None:
        layers.to_csv(out / "layer_sinks.csv")
    if stats.keep_examples:
        stats.examples_frame().to_csv(out / "examples.csv", index=False)
    explained = stats.explained_heads()
    per_layer = frame.groupby("layer")[["sink_density_mean", "image_mass_text_mean"]].mean()
    table = Table(title="vision-sink density per layer (mean over heads) and its densest head")
    columns = ["layer", "mean sink density", "densest head", "its density", "text→image mass", "null-explained heads"]
    if layers is not None:
        columns += ["massive sinks", "EAH sinks", "overlap (Jaccard)"]
    for col in columns:
        table.add_column(col, justify="right")
    for layer, row in per_layer.iterrows():
        top = stats.rank("sink_density", layer=int(layer)).iloc[0]
        flagged = explained[explained.layer == layer]["head"].tolist()
        cells = [
            str(layer), f"{row.sink_density_mean:.3f}", str(int(top['head'])),
            f"{top.sink_density_mean:.3f}", f"{row.image_mass_text_mean:.3f}",
            ",".join(str(int(h)) for h in flagged) or "-",
        ]
        if layers is not None:
            if layer in layers.index:
                lrow = layers.loc[layer]
                cells += [f"{lrow.massive_sinks_mean:.2f}", f"{lrow.eah_sinks_mean:.2f}", f"{lrow.pooled_jaccard:.3f}"]
            else:
                cells += ["-", "-", "-"]
        table.add_row(*cells)
    if len(explained):
        table.caption = (
            f"{len(explained)} head(s) flagged: at threshold {stats.threshold:g} with normalise={stats.normalise!r} a pure "
            "previous-token or uniform pattern would mark as many image tokens as sinks (see eah_interp.sinks.density_curve)"
        )
    return table


@app.command()
def scan(
    model: ModelOpt = "organism",
    n: Annotated[int | None, _n_option("all, or 32 held-out scenes; under torchrun write -n: torchrun takes --n")] = None,
    images: ImagesOpt = None,
    coco_instances: CocoOpt = None,
    pope: PopeOpt = None,
    seed: SeedOpt = 0,
    prompt: PromptOpt = None,
    threshold: Annotated[float | None, typer.Option(help="sink threshold (default: the model's)")] = None,
    normalise: Annotated[str, typer.Option(help="'causal', 'official' or 'rows' (bidirectional image attention: Gemma 3, PaliGemma)")] = "causal",
    batch_size: BatchOpt = 8,
    out: Annotated[Path, typer.Option(help="output folder (rerun to resume)")] = Path("runs/scan"),
    resume: Annotated[bool, typer.Option(
        "--resume/--no-resume",
        help=f"continue from OUT/{SCAN_CHECKPOINT} (same model, threshold, normalisation; default), or start over",
    )] = True,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
    trust_remote_code: TrustOpt = False,
    shard: Annotated[str | None, typer.Option(
        help="i/N: scan only items i, i+N, ... (a separate job; combine with `eah-interp merge`). Under torchrun "
             "or accelerate launch the ranks shard the data by themselves.",
    )] = None,
    sink_dims: Annotated[str | None, typer.Option(
        help="comma-separated hidden dimensions of the model's massive activations (e.g. 2533,1415 for "
             "LLaVA-1.5-7B): also count massive-activation sinks per layer and their overlap with EAH's "
             "(layer_sinks.csv)",
    )] = None,
    tau: Annotated[float, typer.Option(help="massive-activation threshold for --sink-dims (VAR: 20)")] = 20.0,
    keep_examples: Annotated[bool, typer.Option(
        "--keep-examples", help="also keep every image's values (examples.csv, for paired tests)")] = False,
) -> None:
    """Head statistics over a dataset's images → head_stats.csv + sink_density.png, and a per-layer table. Resumable.

    The images: --pope files, --coco-instances, or a plain --images folder (each with --images DIR), or,
    with none of them, held-out synthetic scenes. After every batch the running statistics and the names
    of the counted images are written, atomically, to OUT/scan_checkpoint.safetensors. Rerunning the same
    command continues from there without counting an image twice; for the scenes, a larger --n extends a
    finished scan. A checkpoint written with another model, threshold, normalisation or dataset is an
    error (use another --out, or --no-resume to discard it).

    Launched with torchrun / accelerate launch, each rank scans its shard (item index modulo world size)
    into its own checkpoint and rank 0 merges them; with --shard i/N, run `eah-interp merge` afterwards.
    Images are read one batch at a time: an unreadable image stops the scan with its name, and the
    checkpoint keeps every batch before it (fix or remove the file, rerun the command to continue).
    """
    from eah_interp import distributed
    from eah_interp.errors import DataFormatError

    with _usage("--shard"):
        part = distributed.Shard.resolve(shard)
    try:
        dims = None if sink_dims is None else tuple(int(d) for d in sink_dims.split(",") if d.strip())
    except ValueError as err:
        raise typer.BadParameter(f"--sink-dims takes comma-separated integers (e.g. 2533,1415); got {sink_dims!r}.",
                                 param_hint="--sink-dims") from err
    with _usage():
        dataset = _dataset(images=images, coco_instances=coco_instances, pope=pope, n=n, seed=seed, default_scenes=32)
    bundle = _load(model, prompt=prompt, dtype=dtype, device=device, device_map=device_map,
                   trust_remote_code=trust_remote_code)
    console.print(f"[bold]data:[/] {dataset.describe()}")
    items = [(item.id, item.load_image) for item in dataset]  # loaders: a shard reads only its own images
    with _usage("--out"):
        try:
            result = distributed.scan(bundle, items, out, shard=part, dataset=_scan_source(dataset),
                                      threshold=threshold, normalise=normalise, batch_size=batch_size, resume=resume,
                                      log=console.print, keep_examples=keep_examples, sink_dims=dims, tau=tau)
        except DataFormatError as err:  # raised while reading an image: what is counted so far is in the checkpoint
            raise typer.BadParameter(f"{err} The batches before it are kept in {out / part.checkpoint_name}: rerun "
                                     "this command to continue.", param_hint="--images") from None
    if not result.merged:
        merge_hint = "rank 0 merges" if part.launched else f"when all {part.count} shards are done: eah-interp merge {out}"
        console.print(f"shard {part} done: {result.checkpoint} ({merge_hint})")
        return
    console.print(_write_scan(result.stats, out, f"{bundle.name}: sink density (n={len(dataset)})"))
    console.print(f"wrote {out / 'head_stats.csv'} and {out / 'sink_density.png'} (checkpoint: {out / SCAN_CHECKPOINT})")


def _scan_source(dataset) -> str:
    """What a scan checkpoint records as its data: a checkpoint of other data is neither resumed nor merged.

    Held-out scenes are the same images whatever ``n`` (scene i is always scene i), so ``n`` is left out
    and a larger ``--n`` extends a scan; a draw from a folder or file keeps ``n`` and ``seed`` (another draw
    is another set of images).
    """
    if dataset.name == "scenes":
        return f"held-out scenes, pair strength {dataset.source.get('pair_strength', 0.9)}"
    return f"{dataset.name}: {json.dumps(dataset.source, sort_keys=True, default=str)}"


@app.command()
def generate(
    model: ModelOpt = "organism",
    interventions: Annotated[str, typer.Option("--interventions", "-i", help=f"{SPEC_HELP}. Captioned beside the "
                                               "baseline ('none': the baseline only)")] = "eah",
    images: ImagesOpt = None,
    coco_instances: CocoOpt = None,
    pope: PopeOpt = None,
    n: Annotated[int | None, _n_option("4 from --images / --coco-instances / --pope")] = None,
    seed: SeedOpt = 0,
    prompt: PromptOpt = None,
    scenes: Annotated[int, typer.Option(min=0, help="held-out scenes to caption (when no dataset option is given)")] = 4,
    photo: Annotated[list[str] | None, typer.Option(help="skimage.data photo names, e.g. chelsea")] = None,
    image: Annotated[list[Path] | None, typer.Option(help="image files")] = None,
    max_new_tokens: TokensOpt = 30,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Caption images, baseline and with --interventions (default: EAH, the paper preset) side by side.

    The images: a dataset (--images DIR, with --coco-instances or --pope for their file names; --n of
    them drawn with --seed), or else --scenes held-out scenes plus any --photo / --image.
    """
    from eah_interp.experiments import check_fits
    from eah_interp.interventions import parse

    with _usage():
        if images is not None or coco_instances is not None or pope:
            dataset = _dataset(images=images, coco_instances=coco_instances, pope=pope, n=4 if n is None else n,
                               seed=seed, default_scenes=scenes)
            items = list(dataset) + _images(0, photo or [], image or [])
        else:
            items = _images(scenes if n is None else n, photo or [], image or [])
    if not items:
        raise typer.BadParameter("no images to caption: pass --scenes N (at least 1), --image FILE, --photo NAME or "
                                 "--images DIR.", param_hint="--scenes")
    bundle = _load(model, prompt=prompt, dtype=dtype, device=device, device_map=device_map,
                   trust_remote_code=trust_remote_code)
    with _usage("--interventions"):  # a bad spec, or a layer the model lacks: refused before anything runs
        chosen = parse(interventions, defaults=bundle.intervention_defaults())
        check_fits(bundle.model, chosen)
    with _usage():  # an unreadable image names its file
        _caption_table(bundle, interventions, chosen, items, max_new_tokens)


def _caption_table(bundle, label: str, interventions, items, max_new_tokens: int):
    """Caption `Item`s with the plain model and (when ``interventions`` is not empty, checked with
    `check_fits` by the caller) with them; print a table."""
    from eah_interp.data import LazyImages
    from eah_interp.evaluation.arms import Arm, edits_text
    from eah_interp.experiments import generate_texts
    from eah_interp.models import model_shape

    console.print(f"[bold]{label}:[/] {edits_text(Arm(label, interventions).edits(model_shape(bundle.model)[0]))}")
    prompts = [bundle.caption_prompt] * len(items)
    base, _ = generate_texts(bundle, prompts, LazyImages(items), max_new_tokens=max_new_tokens, desc="baseline")
    rows = [[item.id, ", ".join(sorted(item.objects)) if item.objects else "?", b] for item, b in zip(items, base, strict=True)]
    columns, edited = ["image", "objects", "baseline"], None
    if interventions:
        edited, heads = generate_texts(bundle, prompts, LazyImages(items), interventions=interventions,
                                       max_new_tokens=max_new_tokens, desc=label)
        columns.append(label)
        for row, e in zip(rows, edited, strict=True):
            row.append(e)
        if any(heads):
            columns.append("EAH source head")
            for row, h in zip(rows, heads, strict=True):
                row.append(", ".join(map(str, h)))
    table = Table(title=f"captions: {' vs '.join(columns[2:4])}", show_lines=True)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    return base, edited


@app.command()
def demo(
    model: ModelOpt = "organism",
    n_scan: Annotated[int, typer.Option(min=1, help="scenes for the head scan")] = 16,
    n_captions: Annotated[int, typer.Option(min=1, help="scenes to caption")] = 8,
    out: Path = Path("runs/demo"),
) -> None:
    """The main job: head scan + EAH vs baseline captions (with CHAIR) on the bundled model."""
    from eah_interp.data import LazyImages
    from eah_interp.experiments import check_fits, scan_images
    from eah_interp.interventions import parse

    bundle = _load(model, fallback=True)
    with _usage("--model"):  # the eah preset's layer on a model too shallow for it
        eah = parse("eah", defaults=bundle.intervention_defaults())
        check_fits(bundle.model, eah)
    stats = scan_images(bundle, LazyImages(_images(n_scan, [], [])))
    console.print(_write_scan(stats, out, f"{bundle.name}: sink density (n={n_scan})"))
    items = _images(n_captions, ["chelsea"], [])
    base, edited = _caption_table(bundle, "eah", eah, items, 30)
    summary: dict = {"model": bundle.name, "trained": bundle.trained, "n_captions": n_captions}
    if bundle.trained:
        from eah_interp.metrics import chair_scores

        truth = [item.objects for item in items if item.objects is not None]
        for name, caps in (("baseline", base), ("eah", edited)):
            scores = chair_scores(caps[: len(truth)], truth, vocabulary="scenes")
            summary[name] = {k: round(scores[k], 4) for k in ("chair_s", "chair_i", "recall", "length")}
        console.print(f"CHAIR on {len(truth)} scenes: baseline {summary['baseline']}  EAH {summary['eah']}")
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    console.print(f"wrote {out}/head_stats.csv, sink_density.png, demo_summary.json")


@app.command("eval")
def evaluate(
    model: ModelOpt = "organism",
    arm_specs: Annotated[list[str] | None, typer.Option("--arm", help=(
        f"an arm (repeat for several): {SPEC_HELP}; the spec text is the arm's name. Or the name of a default arm "
        "(eah_paper, eah_reference, control_random_head, control_fewest_sinks, control_deep_layer, control_sink_free, "
        "baseline_beamN, eah_paper_beamN). The baseline always runs. Default: every default arm"))] = None,
    images: ImagesOpt = None,
    coco_instances: CocoOpt = None,
    pope: PopeOpt = None,
    generate_pope: Annotated[bool, typer.Option(
        "--generate-pope", help="ask POPE questions (random, popular, adversarial) generated from --coco-instances",
    )] = False,
    n: Annotated[int | None, _n_option("all, or 100 held-out scenes")] = None,
    seed: SeedOpt = 0,
    prompt: PromptOpt = None,
    max_new_tokens: TokensOpt = 30,
    chair_protocol: Annotated[str | None, typer.Option(
        help="CHAIR word matching: 'reference', 'strict' or 'both' (COCO: reference in the main metrics, strict "
             "as *_strict beside them); default: reference for COCO, strict for scenes",
    )] = None,
    out: Annotated[Path, typer.Option(help="output folder (rerun to resume)")] = Path("runs/eval"),
    beams: Annotated[int, typer.Option(min=1, help="beam width of the beam-search arms (1 = none)")] = 3,
    tasks: Annotated[list[str] | None, typer.Option("--task", help="caption and/or pope")] = None,
    batch_size: BatchOpt = 8,
    bootstrap: Annotated[int, typer.Option(min=1, help="bootstrap resamples")] = 5000,
    scan: Annotated[int, typer.Option(min=0, help="also scan head statistics over this many of the dataset's images (0 = no)")] = 0,
    replication: Annotated[float | None, typer.Option(
        help="pre-registered replication split: this share of the items (e.g. 0.5) is kept to confirm what the rest "
             "discovers; each part gets its own tables and Holm family, and the report says what replicated",
    )] = None,
    replicate_by: Annotated[str, typer.Option(
        help="how items are split: 'hash' (sha256 of the item id; stable under sampling and sharding) or 'order' "
             "(the last items in dataset order: for scenes, the upper seed range)",
    )] = "hash",
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
    trust_remote_code: TrustOpt = False,
    shard: Annotated[str | None, typer.Option(
        help="i/N: evaluate only items i, i+N, ... into OUT/items.shard-i-of-N.jsonl (a separate job); rerun "
             "without --shard to merge and report. Under torchrun or accelerate launch the ranks shard the data "
             "by themselves and rank 0 merges.",
    )] = None,
) -> None:
    """Baseline vs EAH (paper, reference) vs controls, or the --arm specs, on any model and dataset. Resumable.

    CHAIR, POPE per split, the logit probe. The dataset: --pope files (with --coco-instances, captions get
    CHAIR too), --coco-instances (add --generate-pope for POPE questions), a plain --images folder
    (captions only), each with --images DIR; or, with none of them, held-out synthetic scenes. Paired
    bootstrap CIs, permutation p-values and Holm-adjusted p-values across all arms x metrics; with
    --replication, a pre-registered discovery / replication split (Holm within each part; "replicated" =
    significant after Holm in both, same sign). report.md names the layers each arm edits.
    """
    import dataclasses
    import functools
    import warnings

    from eah_interp import distributed
    from eah_interp.evaluation import (
        Arm,
        ArmWarning,
        ReplicationSplit,
        default_arms,
        run_experiment,
        write_report,
    )
    from eah_interp.experiments import scan_images
    from eah_interp.resumable import read_items

    if chair_protocol not in (None, "reference", "strict", "both"):
        raise typer.BadParameter(f"--chair-protocol must be 'reference', 'strict' or 'both'; got {chair_protocol!r}.")
    with _usage("--shard"):
        part = distributed.Shard.resolve(shard)
    with _usage():
        dataset = _dataset(images=images, coco_instances=coco_instances, pope=pope, n=n, seed=seed,
                           default_scenes=100, generate_pope=generate_pope)
    console.print(f"[bold]data:[/] {dataset.describe()}")
    split = None
    if replication is not None:
        with _usage("--replication / --replicate-by"):
            split = ReplicationSplit(replication, by=replicate_by)
            split.assign([item.id for item in dataset])  # a part left empty is an error now, not after the run
        if split.by == "order" and part.count > 1:
            raise typer.BadParameter(
                "--replicate-by order splits the whole dataset by position, which a shard does not see; "
                "use --replicate-by hash with --shard (or under torchrun / accelerate launch).",
                param_hint="--replicate-by",
            )
        console.print(f"[bold]replication:[/] {split.describe()}")
    bundle = _load(model, prompt=prompt, dtype=dtype, device=device, device_map=device_map,
                   trust_remote_code=trust_remote_code)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        arms = default_arms(bundle, beams=beams)
    notes = {w.message.arm: w.message for w in caught if isinstance(w.message, ArmWarning)}
    if arm_specs:
        named = {a.name: a for a in arms}
        if left_out := [spec for spec in arm_specs if spec in notes and spec not in named]:
            raise typer.BadParameter(str(notes[left_out[0]]), param_hint="--arm")
        with _usage("--arm"):
            chosen = [named.get(spec) or Arm.from_spec(spec, defaults=bundle.intervention_defaults())
                      for spec in arm_specs]
        arms = list({a.name: a for a in [arms[0], *chosen] if a.interventions or a.num_beams > 1 or a is arms[0]}.values())
    running = {a.name for a in arms}
    for w in caught:  # the default arms' notes: about an arm that runs
        if not arm_specs or (isinstance(w.message, ArmWarning) and w.message.arm in running):
            console.print(f"[yellow]{w.message}[/]")
    chosen_tasks = tuple(tasks or ("caption", "pope"))
    if "pope" in chosen_tasks and not dataset.n_questions:
        console.print("[yellow]no yes/no questions in this dataset (pass --pope FILE, or --generate-pope with "
                      "--coco-instances): POPE is skipped.[/]")
    run = functools.partial(run_experiment, bundle, arms=arms, tasks=chosen_tasks,
                            max_new_tokens=max_new_tokens, chair_protocol=chair_protocol, batch_size=batch_size,
                            replication=split)
    with _usage():
        items = distributed.run_sharded(
            lambda chosen, name: run(dataclasses.replace(dataset, items=tuple(chosen)), out, items_file=name),
            dataset.items, out, part, log=console.print)
    if items is None:
        hint = ("rank 0 merges" if part.launched else f"when all {part.count} shards are done, rerun this command "
                "without --shard: it merges them, runs anything missing and writes the report")
        mine = distributed.items_path(out, part)
        console.print(f"shard {part} done: {mine if mine.exists() else 'no items fell to it'} ({hint})")
        return
    title = " vs ".join(a.name for a in arms) if arm_specs else "baseline vs EAH vs controls"
    summary = write_report(items, out, title=f"{bundle.name}: {title}", n_resamples=bootstrap)
    if scan:
        from eah_interp.data import LazyImages

        scanned = dataset.items[:scan]
        stats = scan_images(bundle, LazyImages(scanned), batch_size=batch_size)
        console.print(_write_scan(stats, out, f"{bundle.name}: sink density (n={len(scanned)})"))
        per_layer = stats.to_frame().groupby("layer").agg(
            sink_density=("sink_density_mean", "mean"), max_head_density=("sink_density_mean", "max"),
            image_mass_text=("image_mass_text_mean", "mean"), entropy=("entropy_mean", "mean"),
        )
        with (out / "report.md").open("a") as f:
            f.write("\n".join([f"## Head statistics over {len(scanned)} images of the dataset (threshold "
                               f"{stats.threshold})", "", "![sink density](sink_density.png)", "",
                               per_layer.round(3).to_markdown(), ""]) + "\n")
    typer.echo((out / "report.md").read_text())  # plain text: tables stay whole, whatever the terminal's width
    wrote = [f"items.jsonl ({len(read_items(items)[0])} results)", "run.json",
             f"results.csv ({len(summary)} rows: arm x metric)", "report.md"]
    wrote += [f for f in ("replication.csv", "effects.png", "head_stats.csv", "sink_density.png") if (out / f).exists()]
    console.print(f"wrote {out}/: " + ", ".join(wrote))


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

    target = out or (paths[0] if paths[0].is_dir() else paths[0].parent)
    with _usage():
        if items:
            console.print(f"wrote {distributed.merge_items(items, target / 'items.jsonl')}")
            if not any(p.is_file() or distributed.find_shards([p], missing_ok=True) for p in paths):
                return  # items only
        stats = distributed.merge_scan(paths, target, partial=partial)
    n = max(stats.n_examples(layer) for layer in stats.layers) if stats.layers else 0
    console.print(_write_scan(stats, target, f"{stats.model or 'model'}: sink density (n={n})"))
    console.print(f"merged {n} images into {target / 'head_stats.csv'} (checkpoint: {target / SCAN_CHECKPOINT})")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
