"""The eval loaders on folders written in each release's exact layout: ReS (both directions, the move, the
completion mask, occluded views only as sources, masks stored smaller), iHarmony4, Places2-style; a bad
layout is one InputError naming the file."""
from __future__ import annotations

import numpy as np
import pytest
from eval_layouts import RES_SIZE, rect_mask, write_res_view
from PIL import Image

from editrt.errors import EditError
from editrt.eval.datasets import center_box, iharmony_samples, inpaint_samples, res_tasks


def test_res_both_directions_move_is_the_centre_difference(res_root):
    tasks = list(res_tasks(res_root, short_side=128))
    assert [(t.sample, t.direction) for t in tasks] == [("p1", "1to2"), ("p1", "2to1"), ("p2", "1to2"), ("p2", "2to1")]
    # rectangle centres: ((x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2); p1: (33.5, 36.5) -> (83.5, 46.5)
    assert tasks[0].move == (50, 10) and tasks[1].move == (-50, -10)
    assert tasks[2].move == (-50, -10) and tasks[3].move == (50, 10)
    # masks stored at half size come back as the full-size rectangles
    assert np.array_equal(tasks[0].subject, rect_mask(RES_SIZE, (24, 50, 24, 44)))
    assert np.array_equal(tasks[1].subject, rect_mask(RES_SIZE, (34, 60, 74, 94)))
    # the target is the other view as decoded (short side already 128: no resize)
    assert np.array_equal(tasks[0].target, np.asarray(Image.open(res_root / "p1_2.jpg").convert("RGB")))
    assert np.array_equal(tasks[1].source, tasks[0].target)
    assert not any(t.complete.any() for t in tasks)  # no amodal masks: nothing to complete


def test_res_occluded_view_is_only_a_source_and_its_amodal_gives_the_completion_mask(tmp_path, res_photo):
    root = tmp_path / "ReS"
    root.mkdir()
    # p1_1: the subject's lower 10 rows are hidden (visible rows 24..40, whole 24..50); p1_2 in full view
    write_res_view(root, 1, 1, res_photo, (24, 40, 24, 44), amodal=(24, 50, 24, 44))
    write_res_view(root, 1, 2, res_photo, (34, 60, 74, 94))
    # p2_2 has an amodal file equal to its visible mask: not occluded, both directions stay
    write_res_view(root, 2, 1, res_photo, (74, 100, 100, 120))
    write_res_view(root, 2, 2, res_photo, (64, 90, 50, 70), amodal=(64, 90, 50, 70))
    heard = []
    tasks = list(res_tasks(root, short_side=128, log=heard.append))
    assert [(t.sample, t.direction) for t in tasks] == [("p1", "1to2"), ("p2", "1to2"), ("p2", "2to1")]
    assert heard == ["p1_1: occluded subject; used only as a source (no 2to1 task)"]
    task = tasks[0]
    # the source centre is the whole (amodal) subject's: (33.5, 36.5) -> (83.5, 46.5)
    assert task.move == (50, 10)
    # completion = the amodal moved by (50, 10) minus the visible moved: rows 50..60, cols 74..94
    assert np.array_equal(task.complete, rect_mask(RES_SIZE, (50, 60, 74, 94)))
    assert np.array_equal(task.subject, rect_mask(RES_SIZE, (24, 40, 24, 44)))


def test_res_short_side_resizes_images_and_masks_together(res_root):
    task = next(res_tasks(res_root, short_side=64))
    assert task.source.shape == (64, 80, 3) and task.subject.shape == (64, 80)
    assert np.array_equal(task.subject, rect_mask((64, 80), (12, 25, 12, 22)))  # the stored half-size mask
    assert task.move == (25, 5)
    # the paper's 512 by default: images bicubic, masks nearest from their stored size
    task = next(res_tasks(res_root))
    assert task.source.shape == (512, 640, 3)
    assert np.array_equal(task.subject, rect_mask((512, 640), (96, 200, 96, 176)))
    assert task.move == (200, 40)


@pytest.mark.parametrize("breakage, named", [
    (lambda root: (root / "p2_2.jpg").unlink(), "p2_2.jpg: missing"),
    (lambda root: (root / "p1_2_mask.png").unlink(), "p1_2_mask.png: missing"),
    (lambda root: Image.new("L", (100, 100), 255).save(root / "p1_1_mask.png"), "p1_1_mask.png: size 100x100 does "
     "not have the aspect"),
    (lambda root: Image.new("L", (80, 64), 0).save(root / "p2_1_mask.png"), "p2_1_mask.png: is empty"),
    (lambda root: (root / "p1_1.jpg").write_bytes(b"not a jpeg"), "p1_1.jpg: cannot read it as an image"),
])
def test_res_bad_layout_names_the_file(res_root, breakage, named):
    breakage(res_root)
    with pytest.raises(EditError) as e:
        list(res_tasks(res_root))
    assert named in str(e.value) and e.value.field == "root"
    assert "\n" not in str(e.value)


def _iharmony(root, names=("a0001_1_2", "a0002_1_1")):
    for sub in ("composite_images", "masks", "real_images"):
        (root / sub).mkdir(parents=True)
    for name in names:
        base, k, _ = name.split("_")
        Image.new("RGB", (64, 48), (10, 20, 30)).save(root / "composite_images" / f"{name}.jpg")
        Image.new("RGB", (64, 48), (12, 22, 32)).save(root / "real_images" / f"{base}.jpg")
        Image.fromarray(rect_mask((48, 64), (8, 24, 8, 40)).astype(np.uint8) * 255).save(root / "masks" / f"{base}_{k}.png")
    (root / f"{root.name}_test.txt").write_text("".join(f"{n}.jpg\n" for n in names))


def test_iharmony_layout_one_subset_or_several(tmp_path):
    _iharmony(tmp_path / "iH" / "HAdobe5k")
    _iharmony(tmp_path / "iH" / "HFlickr", names=("f1_2_1",))
    samples = iharmony_samples(tmp_path / "iH")
    assert [(s.subset, s.composite.name, s.mask.name, s.real.name) for s in samples] == [
        ("HAdobe5k", "a0001_1_2.jpg", "a0001_1.png", "a0001.jpg"), ("HAdobe5k", "a0002_1_1.jpg", "a0002_1.png", "a0002.jpg"),
        ("HFlickr", "f1_2_1.jpg", "f1_2.png", "f1.jpg")]
    assert len(iharmony_samples(tmp_path / "iH" / "HFlickr")) == 1
    (tmp_path / "iH" / "HFlickr" / "masks" / "f1_2.png").unlink()
    with pytest.raises(EditError, match=r"HFlickr/masks/f1_2.png: missing; listed \(as f1_2_1.jpg\) in HFlickr_test.txt"):
        iharmony_samples(tmp_path / "iH")
    with pytest.raises(EditError, match="no composite_images/"):
        iharmony_samples(tmp_path)


def test_places_layout_files_and_center(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("b", "a"):
        Image.new("RGB", (40, 32)).save(tmp_path / "images" / f"{name}.jpg")
    Image.new("L", (40, 32), 255).save(tmp_path / "masks" / "a.png")
    assert [s[0] for s in inpaint_samples(tmp_path, "center")] == ["a", "b"]
    with pytest.raises(EditError, match=r"masks/b.png: missing; expected the mask of b.jpg"):
        inpaint_samples(tmp_path, "files")
    box = center_box((32, 40))
    assert box.sum() == 16 * 20 and box[8:24, 10:30].all()
