"""`editrt eval` end to end on the tiny weights: every row's metrics recomputed here from the saved image and
its target (uint8, data range 255), the tables, skipped metrics said, bad layouts one line + exit 2 + no output."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from eval_layouts import rect_mask
from PIL import Image
from skimage import data
from skimage.metrics import structural_similarity

from editrt.cli import main

# the subjects' rectangles in conftest's res_root
RECTS = {"p1_1": (24, 50, 24, 44), "p1_2": (34, 60, 74, 94), "p2_1": (74, 100, 100, 120), "p2_2": (64, 90, 50, 70)}


def run(args, capsys):
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def psnr(pred: np.ndarray, target: np.ndarray, region=None) -> float:
    diff = pred.astype(np.float64) - target.astype(np.float64)
    mse = np.mean((diff if region is None else diff[region]) ** 2)
    return 10 * np.log10(255.0 ** 2 / mse)


def rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def tiny(weights):
    return ["--weights", weights, "--steps", "2", "--resolution", "64", "--quiet"]


def test_res_done_when_four_rows_each_psnr_from_the_saved_image(res_root, tiny_weights, alexnet_file, torch_home,
                                                                 tmp_path, capsys):
    out = tmp_path / "P"
    rc, stdout, err = run(["eval", "res", res_root, *tiny(tiny_weights), "--short-side", "128", "--save-images", out,
                           "-o", tmp_path / "runs.jsonl", "--lpips-weights", alexnet_file,
                           "--table-json", tmp_path / "table.json", "--table-md", tmp_path / "table.md"], capsys)
    assert rc == 0, err
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [(r["sample"], r["direction"]) for r in rows] == [("p1", "1to2"), ("p1", "2to1"), ("p2", "1to2"),
                                                              ("p2", "2to1")]
    assert [r["move"] for r in rows] == [[50, 10], [-50, -10], [-50, -10], [50, 10]]
    for row in rows:
        assert set(row["metrics"]) == {"psnr", "ssim", "mse", "lpips"} and row["seconds"] > 0
        assert row["settings"]["protocol"] == "paper" and row["settings"]["short_side"] == 128
        assert row["settings"]["harmonize"] is False and row["settings"]["removal_order"] == "paper"
        pred = rgb(out / f"{row['sample']}_{row['direction']}.png")
        target = rgb(res_root / f"{row['sample']}_{row['direction'][-1]}.jpg")
        assert pred.shape == target.shape == (128, 160, 3)
        assert row["metrics"]["psnr"] == pytest.approx(psnr(pred, target), rel=1e-9)
        # the subject really moved: the source's subject pixels sit where the target has its subject
        source = rgb(res_root / f"{row['sample']}_{row['direction'][0]}.jpg")
        y0, y1, x0, x1 = RECTS[f"{row['sample']}_{row['direction'][0]}"]
        ty0, ty1, tx0, tx1 = RECTS[f"{row['sample']}_{row['direction'][-1]}"]
        assert np.array_equal(pred[ty0:ty1, tx0:tx1], source[y0:y1, x0:x1])
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["columns"] == ["editrt (paper)"] and table["n"] == {"editrt (paper)": 4}
    assert [r["metric"] for r in table["rows"]] == ["LPIPS", "PSNR", "SSIM", "MSE"]
    mean_psnr = table["rows"][1]["values"]["editrt (paper)"]
    assert mean_psnr == pytest.approx(np.mean([r["metrics"]["psnr"] for r in rows]))
    assert "fid" in table["skipped"] and "editrt: fid skipped: no weights" in err  # the hub cache is empty
    assert (tmp_path / "table.md").read_text() == stdout.strip() + "\n"
    assert stdout.splitlines()[0] == "| Model | editrt (paper) |" and "| LPIPS(↓) |" in stdout


def test_res_without_lpips_weights_says_it_is_skipped(res_root, tiny_weights, torch_home, tmp_path, capsys):
    rc, stdout, err = run(["eval", "res", res_root, *tiny(tiny_weights), "--limit", "1", "--protocol", "editrt",
                           "-o", tmp_path / "runs.jsonl"], capsys)
    assert rc == 0, err
    (row,) = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert set(row["metrics"]) == {"psnr", "ssim", "mse"} and row["settings"]["harmonize"] is True
    assert "editrt: lpips skipped: no weights: give --lpips-weights FILE" in err
    assert "LPIPS skipped: no weights" in stdout


def test_res_bad_layout_is_one_line_exit_2_and_nothing_written(res_root, tiny_weights, tmp_path, capsys):
    (res_root / "p2_1_mask.png").unlink()
    rc, _, err = run(["eval", "res", res_root, *tiny(tiny_weights), "--save-images", tmp_path / "P",
                      "-o", tmp_path / "runs.jsonl"], capsys)
    assert rc == 2
    assert err.strip().count("\n") == 0 and "p2_1_mask.png: missing" in err
    assert not (tmp_path / "runs.jsonl").exists() and not (tmp_path / "P").exists()


def test_res_runs_with_the_prompts_file_it_is_given(res_root, tiny_weights, torch_home, tmp_path, capsys):
    """SEELE Table 1's SD rows: `weights prompts --preset` writes a prompts file, `eval res --prompts` runs it
    (the REMOVE pass's prompt changes, so the saved results do); a missing file is one line naming --prompts."""
    prompts = tmp_path / "sd-simple.safetensors"
    assert run(["weights", "prompts", tiny_weights, "--preset", "sd-simple", "-o", prompts, "--quiet"], capsys)[0] == 0
    saved = {}
    for name, extra in (("own", []), ("preset", ["--prompts", prompts])):
        rc, _, err = run(["eval", "res", res_root, *tiny(tiny_weights), "--limit", "1", *extra,
                          "--save-images", tmp_path / name, "-o", tmp_path / f"{name}.jsonl"], capsys)
        assert rc == 0, err
        saved[name] = [np.asarray(Image.open(f)) for f in sorted((tmp_path / name).glob("*.png"))]
    assert len(saved["own"]) == len(saved["preset"]) == 1
    assert not np.array_equal(saved["own"][0], saved["preset"][0])
    rc, _, err = run(["eval", "res", res_root, *tiny(tiny_weights), "--prompts", tmp_path / "none.safetensors",
                      "-o", tmp_path / "x.jsonl"], capsys)
    assert rc == 2 and err.strip().count("\n") == 0 and "--prompts" in err and not (tmp_path / "x.jsonl").exists()


@pytest.fixture
def folder_pair(tmp_path):
    preds, gts, masks = (tmp_path / n for n in ("pred", "gt", "masks"))
    for d in (preds, gts, masks):
        d.mkdir()
    rng = np.random.default_rng(1)
    for name, photo in (("a", data.astronaut()), ("b", data.chelsea())):
        target = np.ascontiguousarray(photo[:96, :128])
        noisy = np.clip(target + rng.normal(0, 12, target.shape), 0, 255).astype(np.uint8)
        Image.fromarray(target).save(gts / f"{name}.png")
        Image.fromarray(noisy).save(preds / f"{name}.png")
        Image.fromarray(rect_mask((96, 128), (10, 50, 20, 90)).astype(np.uint8) * 255).save(masks / f"{name}.png")
    return preds, gts, masks


def test_metrics_command_agrees_with_scikit_image(folder_pair, torch_home, tmp_path, capsys):
    preds, gts, masks = folder_pair
    rc, stdout, err = run(["eval", "metrics", preds, gts, "-o", tmp_path / "m.jsonl"], capsys)
    assert rc == 0, err
    rows = {r["sample"]: r["metrics"] for r in map(json.loads, (tmp_path / "m.jsonl").read_text().splitlines())}
    assert set(rows) == {"a", "b"}
    for name, m in rows.items():
        pred, target = rgb(preds / f"{name}.png"), rgb(gts / f"{name}.png")
        assert m["psnr"] == pytest.approx(psnr(pred, target), rel=1e-9)
        assert m["ssim"] == pytest.approx(structural_similarity(
            target, pred, channel_axis=2, data_range=255, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False), rel=1e-9)
    rc, _, err = run(["eval", "metrics", preds, gts, "--masks", masks, "--region", "mask", "-o",
                      tmp_path / "r.jsonl"], capsys)
    assert rc == 0, err
    region = rect_mask((96, 128), (10, 50, 20, 90))
    for r in map(json.loads, (tmp_path / "r.jsonl").read_text().splitlines()):
        pred, target = rgb(preds / f"{r['sample']}.png"), rgb(gts / f"{r['sample']}.png")
        assert r["metrics"]["psnr"] == pytest.approx(psnr(pred, target, region), rel=1e-9)


def test_metrics_command_lists_each_missing_or_mismatched_file(folder_pair, tmp_path, capsys):
    preds, gts, _ = folder_pair
    (preds / "a.png").unlink()
    Image.new("RGB", (10, 10)).save(preds / "c.png")
    Image.new("RGB", (20, 10)).save(preds / "b.png")
    rc, _, err = run(["eval", "metrics", preds, gts, "-o", tmp_path / "m.jsonl"], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 4, err
    assert "gt/a.png: no prediction of that name" in lines[0]
    assert "pred/c.png: no target of that name" in lines[1]
    assert "pred/b.png: size 20x10 differs from its target" in lines[2]
    assert lines[3].startswith("editrt: error: 3 file(s) missing or mismatched")
    assert not (tmp_path / "m.jsonl").exists()


def test_harmonize_inpaint_reconstruct_rows_from_their_saved_images(tiny_weights, torch_home, tmp_path, capsys):
    photo = np.ascontiguousarray(data.astronaut()[::8, ::8][:64, :64])  # 64 x 64: no resize at --size 64
    fg = rect_mask((64, 64), (16, 48, 8, 40))
    # iHarmony4: one sub-dataset
    h = tmp_path / "iH" / "HCOCO"
    for sub in ("composite_images", "masks", "real_images"):
        (h / sub).mkdir(parents=True)
    composite = photo.copy()
    composite[fg] = (composite[fg] * 0.6).astype(np.uint8)
    Image.fromarray(composite).save(h / "composite_images" / "c1_1_1.png")
    Image.fromarray(photo).save(h / "real_images" / "c1.png")
    Image.fromarray(fg.astype(np.uint8) * 255).save(h / "masks" / "c1_1.png")
    (h / "HCOCO_test.txt").write_text("c1_1_1.png\n")
    rc, stdout, err = run(["eval", "harmonize", tmp_path / "iH", "--size", "64", *tiny(tiny_weights),
                           "--save-images", tmp_path / "H", "-o", tmp_path / "h.jsonl"], capsys)
    assert rc == 0, err
    (row,) = map(json.loads, (tmp_path / "h.jsonl").read_text().splitlines())
    pred = rgb(tmp_path / "H" / "c1_1_1.png")
    diff2 = (pred.astype(np.float64) - photo) ** 2
    assert row["subset"] == "HCOCO"
    assert row["metrics"]["fmse"] == pytest.approx(diff2[fg].mean(), rel=1e-9)
    assert row["metrics"]["mse"] == pytest.approx(diff2.mean(), rel=1e-9)
    assert stdout.splitlines()[0] == "| Model | All | HCOCO |" and "| fMSE(↓) |" in stdout

    # Places2-style, centred box
    (tmp_path / "pl" / "images").mkdir(parents=True)
    Image.fromarray(photo).save(tmp_path / "pl" / "images" / "x.png")
    rc, _, err = run(["eval", "inpaint", tmp_path / "pl", "--mask-protocol", "center", "--region", "mask",
                      *tiny(tiny_weights), "--save-images", tmp_path / "I", "-o", tmp_path / "i.jsonl"], capsys)
    assert rc == 0, err
    (row,) = map(json.loads, (tmp_path / "i.jsonl").read_text().splitlines())
    box = rect_mask((64, 64), (16, 48, 16, 48))
    assert row["metrics"]["psnr"] == pytest.approx(psnr(rgb(tmp_path / "I" / "x.png"), photo, box), rel=1e-9)

    # EIE reconstruction at --square 64
    rc, _, err = run(["eval", "reconstruct", tmp_path / "pl" / "images", "--square", "64", *tiny(tiny_weights),
                      "--save-images", tmp_path / "R", "-o", tmp_path / "e.jsonl"], capsys)
    assert rc == 0, err
    (row,) = map(json.loads, (tmp_path / "e.jsonl").read_text().splitlines())
    assert row["metrics"]["psnr"] == pytest.approx(psnr(rgb(tmp_path / "R" / "x.png"), photo), rel=1e-9)
    assert 0 <= row["working_dropped_fraction"] < 1


def test_editrt_version_imports_no_torch_and_eval_help_lists_the_commands():
    code = ("import sys; from editrt.cli import main; main(['--version']); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split()[-1] == "False", done.stdout + done.stderr
    done = subprocess.run([sys.executable, "-m", "editrt.cli", "eval", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    assert all(name in done.stdout for name in ("res", "metrics", "harmonize", "inpaint", "reconstruct"))


def test_a_refused_sample_is_an_error_row_the_others_are_scored_and_the_exit_code_is_1(res_root, torch_home,
                                                                                      tmp_path, capsys):
    import argparse

    from editrt.errors import InputError
    from editrt.eval import res
    from editrt.eval.runner import prepare_scorer, run_eval
    from editrt.runtime.reposition import RepositionResult

    class RefusesLeftwardMoves:
        """An editor that returns its input unchanged and refuses moves to the left."""
        def __call__(self, image, move, **options):
            if move[0] < 0:
                raise InputError(f"move {move}: refused", field="move")
            return RepositionResult(Image.fromarray(image))

    args = argparse.Namespace(lpips_weights=None, fid_weights=None, device="cpu", save_images=None,
                              output=tmp_path / "runs.jsonl", table_md=None, table_json=None)
    settings = res.settings_for("paper", 128, 2, 1.0, 0, None)
    scorer = prepare_scorer(args)
    rc = run_eval(args, scorer, "x", lambda s: res.evaluate(RefusesLeftwardMoves(), res_root, settings, s))
    err = capsys.readouterr().err
    assert rc == 1
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [("error" in r, "metrics" in r) for r in rows] == [(False, True), (True, False), (True, False),
                                                             (False, True)]
    assert rows[1]["error"] == "move (-50, -10): refused"
    assert "editrt: p1 2to1: move (-50, -10): refused" in err


def test_table_puts_runs_side_by_side_as_table_1(tmp_path, capsys):
    runs = {"a": [{"psnr": 20.0, "lpips": 0.2}, {"psnr": 22.0, "lpips": 0.1}], "b": [{"psnr": "inf", "lpips": 0.3}]}
    for name, metrics in runs.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"sample": "p1", "metrics": m}) + "\n"
                                                        for m in metrics) + json.dumps({"sample": "p9", "error": "x"}))
    rc, stdout, err = run(["eval", "table", f"SD simple={tmp_path / 'a.jsonl'}", tmp_path / "b.jsonl",
                           "--table-json", tmp_path / "t.json"], capsys)
    assert rc == 0, err
    assert stdout.splitlines()[:4] == ["| Model | SD simple | b |", "| --- | --- | --- |",
                                       "| LPIPS(↓) | 0.150 | 0.300 |", "| PSNR(↑) | 21.000 | inf |"]
    assert stdout.splitlines()[4] == "| n | 2 | 1 |"
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["rows"][1]["values"] == {"SD simple": 21.0, "b": "inf"}
    (tmp_path / "c.jsonl").write_text('{"sample": "p1", "metrics": {"psnr": 1}}\nnot json\n')
    rc, _, err = run(["eval", "table", tmp_path / "c.jsonl"], capsys)
    assert rc == 2 and "c.jsonl: line 2 is not an eval row" in err and err.count("\n") == 1
