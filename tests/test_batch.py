"""`cascade batch` (cascade/batch.py) with the demo model: JSONL and text jobs, stable names, resuming,
errors.jsonl, the summary."""
import json

import numpy as np
import PIL.Image
import pytest

from cascade.batch import Line, output_name, read_jobs, run_line
from cascade.cli import main
from cascade.jobs import Models, Recipe, run

FAST = ["--steps", "2", "--prior-steps", "2"]
PROMPT = "a red circle on a blue background"


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def pngs(folder):
    return sorted(p.name for p in folder.glob("*.png"))


@pytest.fixture(scope="module")
def jsonl_run(tmp_path_factory):
    """A JSONL batch of four lines (two good, one not a recipe, one not JSON), run once."""
    root = tmp_path_factory.mktemp("jsonl")
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(root / "in.png")
    lines = [{"prompt": PROMPT, "seed": 4},
             {"prompt": "a green square on a black background", "task": "img2img", "image": "in.png",
              "strength": 0.5},
             {"prompt": PROMPT, "stepz": 3},
             "{not json"]
    (root / "jobs.jsonl").write_text("\n".join(line if isinstance(line, str) else json.dumps(line)
                                               for line in lines) + "\n")
    return root


def test_jsonl_batch_names_errors_and_summary(jsonl_run, capsys):
    root, out = jsonl_run, jsonl_run / "out"
    code, stdout, _ = cli(capsys, "batch", root / "jobs.jsonl", "--out", out, "--model", "demo", *FAST, "-q",
                          "--seed", "10")
    assert code == 1  # some lines failed
    assert stdout.startswith("done 2, skipped 0, failed 2: 2 images in ") and "images per minute" in stdout
    names = pngs(out)
    assert len(names) == 2 and names[0].startswith("00001-") and names[0].endswith("-4.png")
    assert names[1].startswith("00002-") and names[1].endswith("-11.png")  # line 2 (i = 1) got --seed + 1
    made = PIL.Image.open(out / names[1]).text
    assert (made["task"], made["image"], made["model"], made["steps"]) == ("img2img", "../in.png", "demo", "2")
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [3, 4]
    assert errors[0]["error"].startswith("stepz: not a recipe key") and "not JSON" in errors[1]["error"]
    assert errors[0]["recipe"]["stepz"] == 3


def test_a_rerun_skips_what_is_done(jsonl_run, capsys):
    root, out = jsonl_run, jsonl_run / "out"
    before = {n: (out / n).stat().st_mtime_ns for n in pngs(out)}
    code, stdout, _ = cli(capsys, "batch", root / "jobs.jsonl", "--out", out, "--model", "demo", *FAST, "-q",
                          "--seed", "10", "--json")
    summary = json.loads(stdout)
    assert code == 1 and (summary["done"], summary["skipped"], summary["failed"], summary["images"]) == (0, 2, 2, 0)
    assert {n: (out / n).stat().st_mtime_ns for n in pngs(out)} == before
    # Another setting is another recipe: a new name, the old file kept.
    code, stdout, _ = cli(capsys, "batch", root / "jobs.jsonl", "--out", out, "--model", "demo", "--steps", "3",
                          "--prior-steps", "2", "-q", "--seed", "10", "--json")
    assert json.loads(stdout)["done"] == 2 and len(pngs(out)) == 4


def test_text_jobs_get_consecutive_seeds_and_match_a_single_run(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text(f"{PROMPT}\n\n# a comment\na yellow triangle on a white background\n")
    assert [line.values for line in read_jobs(tmp_path / "prompts.txt", 5)] == [
        {"prompt": PROMPT, "seed": 5}, {"prompt": "a yellow triangle on a white background", "seed": 6}]
    code, stdout, err = cli(capsys, "batch", tmp_path / "prompts.txt", "--out", tmp_path / "out",
                            "--model", "demo", *FAST, "--seed", "5")
    assert code == 0 and stdout.startswith("done 2, skipped 0, failed 0") and "batch" in err and "2/2" in err
    second = [n for n in pngs(tmp_path / "out") if n.startswith("00004-")]  # its line in the file
    assert len(second) == 1 and second[0].endswith("-6.png")
    [alone] = run(Recipe(model="demo", prompt="a yellow triangle on a white background", seed=6, steps=2,
                         prior_steps=2), Models())
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "out" / second[0])), np.asarray(alone.image))


def test_names_are_stable_and_run_line_is_callable_alone(tmp_path):
    r = Recipe(model="demo", prompt=PROMPT, steps=2, prior_steps=2, seed=3)
    assert output_name(7, r, 3) == output_name(7, Recipe.from_dict(r.to_dict()), 3)
    assert output_name(7, r, 3) != output_name(7, r.replace(steps=3), 3)
    assert output_name(7, r, 3).startswith("00007-") and output_name(7, r, 3).endswith("-3")
    record = run_line(Line(1, {"prompt": PROMPT, "seed": 3, "n": 2}), {"model": "demo", "steps": 2,
                                                                        "prior_steps": 2}, tmp_path, Models(),
                      tmp_path)
    assert (record["status"], record["images"], len(record["paths"])) == ("done", 2, 2)
    again = run_line(Line(1, {"prompt": PROMPT, "seed": 3, "n": 2}), {"model": "demo", "steps": 2,
                                                                       "prior_steps": 2}, tmp_path, Models(),
                     tmp_path)
    assert (again["status"], again["images"]) == ("skipped", 0)


@pytest.mark.parametrize("argv,status,words", [
    (["--steps", "0"], 2, "positive integer"),
    (["--guidance", "inf"], 1, "--guidance: expected a finite number"),
    (["--scheduler", "nope"], 2, "invalid choice"),
    (["--seed", str(2**70)], 2, "--seed"),
])
def test_bad_options_end_before_any_line(tmp_path, capsys, argv, status, words):
    (tmp_path / "jobs.txt").write_text(PROMPT + "\n")
    try:
        code, _, err = cli(capsys, "batch", tmp_path / "jobs.txt", "--out", tmp_path / "out", "--model", "demo",
                           *argv, "-q")
    except SystemExit as exit:
        code, err = exit.code, capsys.readouterr().err
    assert code == status and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_jobs_and_out_a_file(tmp_path, capsys):
    code, _, err = cli(capsys, "batch", tmp_path / "none.jsonl", "--out", tmp_path / "out", "--model", "demo")
    assert code == 1 and "JOBS: " in err and "cannot read" in err
    (tmp_path / "file").write_text("x")
    (tmp_path / "jobs.txt").write_text(PROMPT + "\n")
    code, _, err = cli(capsys, "batch", tmp_path / "jobs.txt", "--out", tmp_path / "file", "--model", "demo")
    assert code == 1 and err.strip() == f"cascade: error: --out: {tmp_path / 'file'} is not a folder"
