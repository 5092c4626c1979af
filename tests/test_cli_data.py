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
        "eval", "--model", "tiny-llava", *data_args(files), "--arm", "eah_paper", "--beams", "1",
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
        "--arm", "eah_paper", "--beams", "1", "--bootstrap", "50", "--out", tmp_path / "gen",
    )
    assert generated.exit_code == 0, generated.output
    report = (tmp_path / "gen" / "report.md").read_text()
    assert all(f"split `{s}`" in report for s in ("random", "popular", "adversarial"))
    folder = invoke(
        "eval", "--model", "tiny-llava", "--images", files["images"], "--n", "2", "--task", "caption",
        "--arm", "eah_paper", "--beams", "1", "--max-new-tokens", "2", "--bootstrap", "50", "--scan", "2",
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
                    "--max-new-tokens", "2", "-i", "none")
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
        "eval", *common, *data_args(files), "--n", "2", "--arm", "eah_paper", "--arm", "control_sink_free",
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
                "--max-new-tokens", "1", "-i", "none")
    assert ok.exit_code == 0, ok.output
    for args, needle in (
        (["--dtype", "float8"], "--dtype"),  # not a floating-point dtype torch knows
        (["--device-map", "auto"], "device"),  # a registry model takes device=, not device_map=
        (["--device", "cpu", "--device-map", "auto"], "device_map"),
    ):
        bad = invoke("scan", "--model", "tiny-llava", *args, "--n", "1", "--out", tmp_path)
        assert bad.exit_code == 2 and "Traceback" not in bad.output, (args, bad.output)
        assert needle in flat(bad.output)


# ---------------------------------------------------------------------------- as a new user tries it (issue 24)
def test_a_corrupt_image_is_one_line_naming_it_and_the_scan_keeps_the_batches_before_it(tmp_path):
    from eah_interp.distributed import read_checkpoint
    from tests.photos import write_photos

    folder = write_photos(tmp_path / "photos")
    (folder / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 20)  # sorted last
    scan = invoke("scan", "--model", "tiny-llava", "--images", folder, "--batch-size", "2", "--out", tmp_path / "s")
    assert scan.exit_code == 2 and "Traceback" not in scan.output, scan.output
    assert "zz_broken.jpg" in flat(scan.output) and "rerun this command to continue" in flat(scan.output)
    # the lazy batches: the first batch (2 photos) was counted and checkpointed before the broken file was read
    assert read_checkpoint(tmp_path / "s" / "scan_checkpoint.safetensors").done == sorted(PHOTOS)[:2]
    for command in (["generate", "--max-new-tokens", "1"], ["eval", "--task", "caption", "--out", tmp_path / "e"]):
        result = invoke(command[0], "--model", "tiny-llava", "--images", folder, *command[1:])
        assert result.exit_code == 2 and "Traceback" not in result.output and "zz_broken.jpg" in flat(result.output)
        assert "--interventions" not in flat(result.output)  # the image is the problem, not the spec


@pytest.mark.parametrize("command", ["scan", "generate", "eval"])
@pytest.mark.parametrize("n", ["0", "-1"])
def test_n_below_one_is_a_usage_error(command, n, tmp_path):
    """Was: scan and eval crashed (an empty stack; no items.jsonl), generate printed an empty table, -1 a traceback."""
    result = invoke(command, "--model", "tiny-llava", "-n", n, *(["--out", tmp_path] if command != "generate" else []))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    message = flat(result.output)  # click's wording of the range differs across the supported typer / click versions
    assert "'--n' / '-n'" in message and ("greater than or equal to 1" in message or "not in the range x>=1" in message)
    assert not list(tmp_path.iterdir())


def test_a_layer_the_model_lacks_is_refused_in_one_line_and_the_report_names_each_arms_layers(tmp_path):
    """eah-reference edits layer 15; tiny-llava has 4 layers: LayerIndexError before anything runs (was: the
    default eval arm silently edited layer 3). The default arm on a shallow model says which layer it edits."""
    for args in (["generate", "-i", "eah-reference"], ["eval", "--arm", "eah-reference", "--out", tmp_path / "x"]):
        result = invoke(args[0], "--model", "tiny-llava", "-n", "1", *args[1:])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert "LayerIndexError" in flat(result.output) and "4 decoder layers" in flat(result.output)
    assert not (tmp_path / "x" / "items.jsonl").exists()
    out = tmp_path / "e"
    result = invoke("eval", "--model", "tiny-llava", "-n", "2", "--arm", "eah_reference", "--arm", "pai(alpha=0.5)",
                    "--task", "pope", "--bootstrap", "20", "--out", out)
    assert result.exit_code == 0, result.output
    assert "eah_reference edits layer 3 (this model's last)" in flat(result.output)
    report = (out / "report.md").read_text()
    assert "| eah_reference | EAH at layers 3 |" in report and "| pai(alpha=0.5) | PAI at layers 0..3 |" in report


def test_eval_arms_are_specs_with_the_models_defaults(tmp_path):
    from eah_interp.models import load_model

    out = tmp_path / "e"
    result = invoke("eval", "--model", "tiny-llava", "-n", "2", "--arm", "eah+pai", "--arm", "var(dims=[3])",
                    "--arm", "none", "--arm", "eah_paper", "--task", "pope", "--bootstrap", "20", "--out", out)
    assert result.exit_code == 0, result.output
    conditions = {json.loads(line)["condition"] for line in (out / "items.jsonl").read_text().splitlines()}
    assert conditions == {"baseline", "eah+pai", "var(dims=[3])", "eah_paper"}  # 'none' is the baseline
    arms = {a["name"]: a for a in json.loads((out / "run.json").read_text())["conditions"]}
    eah, pai = arms["eah+pai"]["interventions"]
    assert (eah["method"], pai["method"]) == ("EAH", "PAI") and eah["threshold"] == load_model("tiny-llava").threshold
    assert arms["var(dims=[3])"]["interventions"][0]["dims"] == [3]
    bad = invoke("eval", "--model", "tiny-llava", "-n", "1", "--arm", "pai(alpha=)", "--out", tmp_path / "b")
    assert bad.exit_code == 2 and "--arm" in flat(bad.output) and "Traceback" not in bad.output


def test_asking_for_a_default_arm_the_model_cannot_have_says_why(idefics3_checkpoint, tmp_path):
    """On a 3-layer model no deep layer is left for control_deep_layer: --arm control_deep_layer gives the
    reason default_arms noted (was: 'unknown intervention', the note never printed)."""
    result = invoke("eval", "--model", idefics3_checkpoint, "--dtype", "float32", "-n", "1",
                    "--arm", "control_deep_layer", "--out", tmp_path / "e")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "control_deep_layer left out" in flat(result.output) and "--arm" in flat(result.output)
    assert not (tmp_path / "e" / "items.jsonl").exists()


def test_generate_takes_an_intervention_spec(tmp_path):
    result = invoke("generate", "--model", "tiny-llava", "--scenes", "1", "--max-new-tokens", "2", "-i", "pai(alpha=0.5)")
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert "baseline vs pai(alpha=0.5)" in out and "PAI at layers 0..3" in out and "source head" not in out
    plain = invoke("generate", "--model", "tiny-llava", "--scenes", "1", "--max-new-tokens", "2", "-i", "none")
    assert plain.exit_code == 0 and "captions: baseline" in flat(plain.output) and " vs " not in flat(plain.output)


def test_eval_prints_the_report_whole_counts_honestly_and_leaves_no_escape_codes(tmp_path):
    out = tmp_path / "e"
    result = CliRunner(env={"COLUMNS": "80"}).invoke(app, [
        "eval", "--model", "tiny-llava", "-n", "2", "--arm", "eah_paper", "--beams", "1", "--max-new-tokens", "2",
        "--bootstrap", "20", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\r" not in result.output  # no progress bar codes in a log
    long_lines = [line for line in (out / "report.md").read_text().splitlines() if len(line) > 80]
    assert long_lines and all(line in result.output.splitlines() for line in long_lines)  # not wrapped at 80
    n_results = len((out / "items.jsonl").read_text().splitlines())
    n_rows = len(pd.read_csv(out / "results.csv"))
    assert n_results != n_rows  # the two counts differ: the line must not name one for the other
    assert f"items.jsonl ({n_results} results)" in flat(result.output)
    assert f"results.csv ({n_rows} rows: arm x metric)" in flat(result.output)
