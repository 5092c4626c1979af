"""`eah-interp scan / generate / eval` on real photos with COCO instances and POPE files, and their usage errors."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from typer.testing import CliRunner

from eah_interp.cli import app
from tests.photos import PHOTOS, photo_dataset


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return photo_dataset(tmp_path_factory.mktemp("coco"))


def flat(text: str) -> str:
    """The output without rich's panel borders and line wrapping."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", text)


def invoke(*args: str):
    return CliRunner(env={"COLUMNS": "1000"}).invoke(app, [str(a) for a in args])  # wide: no wrapped paths


def data_args(files, *, pope=True):
    args = ["--images", files["images"], "--coco-instances", files["instances"]]
    if pope:
        args += ["--pope", files["pope_random"], "--pope", files["pope_adversarial"]]
    return args


@pytest.mark.parametrize("command", ["scan", "generate", "eval"])
@pytest.mark.parametrize("model", ["no-such-model", "/no/such/checkpoint/folder"])
def test_an_unknown_model_is_a_one_line_usage_error(command, model, tmp_path):
    """Trap 8: not a 48-line traceback but exit code 2 and a message naming the option."""
    result = invoke(command, "--model", model, *(["--out", tmp_path] if command != "generate" else []))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    out = flat(result.output)
    assert "--model" in out and model in out


def test_a_malformed_pope_file_is_a_usage_error_naming_file_line_and_field(files, tmp_path):
    bad = tmp_path / "coco_pope_random.json"
    lines = files["pope_random"].read_text().splitlines()
    lines[2] = lines[2].replace('"label": "yes"', '"label": "Y"')
    bad.write_text("\n".join(lines) + "\n")
    result = invoke("eval", "--model", "tiny-llava", "--images", files["images"], "--pope", bad, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "Traceback" not in result.output
    out = flat(result.output)
    assert "line 3" in out and "'label'" in out and "coco_pope_random.json" in out
    missing = invoke("eval", "--model", "tiny-llava", "--pope", files["pope_random"], "--out", tmp_path / "o")
    assert missing.exit_code == 2 and "--images" in flat(missing.output)


def test_eval_on_photos_with_coco_and_two_pope_splits(files, tmp_path):
    out = tmp_path / "eval"
    result = invoke(
        "eval", "--model", "tiny-llava", *data_args(files), "--condition", "eah_paper", "--beams", "1",
        "--max-new-tokens", "3", "--bootstrap", "100", "--out", out,
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    captions = [r for r in records if r["task"] == "caption"]
    questions = [r for r in records if r["task"] == "pope"]
    assert sorted({r["item"] for r in captions}) == sorted(PHOTOS)
    assert len(captions) == 2 * 3 and len(questions) == 2 * 8  # 2 arms x (3 photos; 4 + 4 POPE questions)
    assert {r["chair_protocol"] for r in captions} == {"reference"} and all(r["truth"] for r in captions)
    assert {r["split"] for r in questions} == {"random", "adversarial"}
    run = json.loads((out / "run.json").read_text())
    assert run["arguments"]["dataset"] == "pope" and run["arguments"]["vocabulary"] == "coco"
    report = (out / "report.md").read_text()
    assert "split `random`" in report and "split `adversarial`" in report and "popular" not in report
    assert "Holm p" in report and "CHAIR protocol: `reference`" in report
    summary = pd.read_csv(out / "results.csv")
    assert set(summary["condition"]) == {"baseline", "eah_paper"}
    assert {"chair_s", "pope_acc_random", "pope_f1_adversarial", "probe_absent"} <= set(summary["metric"])


def test_eval_generates_pope_from_coco_and_runs_on_a_plain_folder(files, tmp_path):
    # POPE generation needs images with >= 3 objects and absent objects to ask about: give two photos three
    # made-up objects each (the model has random weights; only the structure matters here)
    instances = json.loads(files["instances"].read_text())
    extra = [(1, 62), (1, 63), (2, 63), (2, 72)]  # chair, couch for the astronaut; couch, tv for the cat
    instances["annotations"] += [{"id": 1000 + i, "image_id": im, "category_id": c} for i, (im, c) in enumerate(extra)]
    instances["categories"] += [{"id": 62, "name": "chair"}, {"id": 63, "name": "couch"}, {"id": 72, "name": "tv"}]
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    generated = invoke(
        "eval", "--model", "tiny-llava", "--images", files["images"], "--coco-instances", tmp_path / "instances.json",
        "--generate-pope", "--task", "pope",
        "--condition", "eah_paper", "--beams", "1", "--bootstrap", "50", "--out", tmp_path / "gen",
    )
    assert generated.exit_code == 0, generated.output
    report = (tmp_path / "gen" / "report.md").read_text()
    assert all(f"split `{s}`" in report for s in ("random", "popular", "adversarial"))
    folder = invoke(
        "eval", "--model", "tiny-llava", "--images", files["images"], "--n", "2", "--task", "caption",
        "--condition", "eah_paper", "--beams", "1", "--max-new-tokens", "2", "--bootstrap", "50", "--scan", "2",
        "--out", tmp_path / "f",
    )
    assert folder.exit_code == 0, folder.output
    report = (tmp_path / "f" / "report.md").read_text()
    assert "undefined (no ground-truth objects)" in report and "length" in report
    assert "Head statistics over 2 images of the dataset" in report
    assert (pd.read_csv(tmp_path / "f" / "head_stats.csv")["n"] == 2).all()


def test_scan_and_generate_take_a_dataset(files, tmp_path):
    result = invoke("scan", "--model", "tiny-llava", *data_args(files, pope=False), "--out", tmp_path)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "head_stats.csv")
    assert len(frame) == 4 * 4 and (frame["n"] == 3).all()  # 4 layers x 4 heads, the 3 photos
    result = invoke("generate", "--model", "tiny-llava", "--images", files["images"], "--n", "2", "--seed", "1",
                    "--max-new-tokens", "2", "--no-eah")
    assert result.exit_code == 0, result.output
    assert sum(name in result.output for name in PHOTOS) == 2


@pytest.mark.parametrize("family", ["llava_checkpoint", "idefics3_checkpoint"])
def test_scan_generate_eval_on_a_checkpoint_folder(family, request, files, tmp_path):
    """A save_pretrained folder (tiny random model, real tokenizer, chat template, image processor) end to end."""
    folder = request.getfixturevalue(family)
    common = ["--model", folder, "--dtype", "float32"]
    scan = invoke("scan", *common, *data_args(files, pope=False), "--n", "2", "--batch-size", "2", "--out", tmp_path / "s")
    assert scan.exit_code == 0, scan.output
    frame = pd.read_csv(tmp_path / "s" / "head_stats.csv")
    assert (frame["n"] == 2).all() and frame["layer"].nunique() >= 2
    generate = invoke("generate", *common, "--images", files["images"], "--n", "2", "--max-new-tokens", "3",
                      "--prompt", "Please describe this image in detail.")
    assert generate.exit_code == 0, generate.output
    assert "source head" in generate.output and sum(name in generate.output for name in PHOTOS) == 2
    out = tmp_path / "e"
    result = invoke(
        "eval", *common, *data_args(files), "--n", "2", "--condition", "eah_paper", "--condition", "control_sink_free",
        "--beams", "1", "--max-new-tokens", "3", "--bootstrap", "50", "--out", out,
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert {r["condition"] for r in records} == {"baseline", "eah_paper", "control_sink_free"}
    assert len({r["item"] for r in records}) == 2
    prompt = json.loads((out / "run.json").read_text())["arguments"]["prompt"]
    assert "Please describe this image in detail." in prompt and prompt != "Please describe this image in detail."
    assert "split `random`" in (out / "report.md").read_text() or "split `adversarial`" in (out / "report.md").read_text()


def test_model_options_reach_load_model_and_their_errors_are_usage_errors(tmp_path):
    ok = invoke("generate", "--model", "tiny-llava", "--device", "cpu", "--dtype", "float32", "--scenes", "1",
                "--max-new-tokens", "1", "--no-eah")
    assert ok.exit_code == 0, ok.output
    for args, needle in (
        (["--dtype", "float8"], "--dtype"),  # not a floating-point dtype torch knows
        (["--device-map", "auto"], "device"),  # a registry model takes device=, not device_map=
        (["--device", "cpu", "--device-map", "auto"], "device_map"),
    ):
        bad = invoke("scan", "--model", "tiny-llava", *args, "--n", "1", "--out", tmp_path)
        assert bad.exit_code == 2 and "Traceback" not in bad.output, (args, bad.output)
        assert needle in flat(bad.output)
