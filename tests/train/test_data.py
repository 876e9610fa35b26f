"""Training data: the plain layout and COCO annotations; a bad dataset is one line naming the file."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from train_fixtures import PHOTOS, SIZE, object_masks, write_plain_dataset

from editrt.cli import main
from editrt.errors import InputError
from editrt.train.data import check_coco, check_plain, decode_segmentation, split_train_val


def test_plain_layout_reads_every_image_and_its_masks(plain_dataset):
    records = check_plain(plain_dataset)
    assert sorted(r.path.stem for r in records) == sorted(PHOTOS)
    for r in records:
        masks, pickable = r.load_masks()
        k = PHOTOS.index(r.path.stem)
        assert r.size == SIZE and pickable == [True, True]
        assert all(np.array_equal(m, e) for m, e in zip(masks, object_masks(SIZE, k)))
        assert r.load_rgb().shape == (*SIZE, 3)


def test_validation_split_holds_out_whole_images_by_seed(plain_dataset):
    records = check_plain(plain_dataset)
    train, val = split_train_val(records, 0.05, seed=0)
    assert len(val) == 1 and len(train) == 5 and not {r.path for r in train} & {r.path for r in val}
    assert [r.path for r in split_train_val(records, 0.05, seed=0)[1]] == [r.path for r in val]
    assert split_train_val(records, 0.0, seed=0) == (records, [])


def _break(folder, how):
    if how == "no masks folder":
        shutil.rmtree(folder / "masks")
        return folder / "masks"
    if how == "image without masks":
        for p in (folder / "masks").glob("coffee_*.png"):
            p.unlink()
        return folder / "images" / "coffee.jpg"
    if how == "mask without image":
        bad = folder / "masks" / "zebra_0.png"
        shutil.copy(folder / "masks" / "coffee_0.png", bad)
        return bad
    if how == "mask of another size":
        bad = folder / "masks" / "rocket_1.png"
        Image.new("L", (SIZE[1] + 1, SIZE[0]), 255).save(bad)
        return bad
    if how == "empty mask":
        bad = folder / "masks" / "chelsea_0.png"
        Image.new("L", (SIZE[1], SIZE[0]), 0).save(bad)
        return bad
    if how == "unreadable image":
        bad = folder / "images" / "astronaut.jpg"
        bad.write_bytes(b"not a jpeg")
        return bad
    if how == "mask name without number":
        bad = folder / "masks" / "coffee_a.png"
        shutil.copy(folder / "masks" / "coffee_0.png", bad)
        return bad
    raise AssertionError(how)


CASES = ("no masks folder", "image without masks", "mask without image", "mask of another size", "empty mask",
         "unreadable image", "mask name without number")


@pytest.mark.parametrize("how", CASES)
def test_a_bad_plain_dataset_is_one_error_naming_the_file(tmp_path, how):
    folder = write_plain_dataset(tmp_path / "data")
    bad = _break(folder, how)
    with pytest.raises(InputError) as e:
        check_plain(folder)
    assert str(bad) in str(e.value)


def test_the_cli_refuses_a_bad_dataset_before_training(tmp_path, tiny_weights, capsys):
    folder = write_plain_dataset(tmp_path / "data")
    bad = _break(folder, "mask of another size")
    out, checkpoints, log = tmp_path / "P.safetensors", tmp_path / "ck", tmp_path / "L.jsonl"
    rc = main(["train", "prompts", "--weights", str(tiny_weights), "--data", str(folder), "--task", "remove",
               "-o", str(out), "--checkpoints", str(checkpoints), "--log", str(log), "--cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(bad) in err[0]
    assert not out.exists() and not checkpoints.exists() and not log.exists()


def _coco_file(folder, records):
    """COCO annotations for the plain dataset's images: each image's ellipse as a polygon, as a compressed RLE
    and as an uncompressed RLE, its box as a crowd region (never picked)."""
    from pycocotools import mask as coco_mask

    images, annotations = [], []
    for i, r in enumerate(records):
        ellipse, box = object_masks(SIZE, PHOTOS.index(r.path.stem))
        images.append({"id": i, "file_name": r.path.name, "width": SIZE[1], "height": SIZE[0]})
        if i % 3 == 0:
            rows, cols = np.nonzero(box)
            x0, y0, x1, y1 = cols.min(), rows.min(), cols.max() + 1, rows.max() + 1
            # an object in two pieces: two polygons, the box's outline and a square's
            ellipse_seg = [[float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)], [2.0, 2.0, 10.0, 2.0, 10.0, 10.0, 2.0, 10.0]]
            ellipse = box.copy()
            ellipse[2:10, 2:10] = True
        elif i % 3 == 1:
            rle = coco_mask.encode(np.asfortranarray(ellipse.astype(np.uint8)))
            ellipse_seg = {"size": rle["size"], "counts": rle["counts"].decode()}
        else:
            flat = ellipse.astype(np.uint8).flatten(order="F")
            runs = np.diff(np.r_[0, np.flatnonzero(np.diff(flat)) + 1, flat.size])  # column-major runs, 0s first
            counts = ([0] if flat[0] else []) + runs.tolist()
            ellipse_seg = {"size": list(SIZE), "counts": counts}
        annotations.append({"id": 2 * i, "image_id": i, "segmentation": ellipse_seg, "iscrowd": 0,
                            "area": float(ellipse.sum()), "expected": ellipse.tolist()})
        annotations.append({"id": 2 * i + 1, "image_id": i, "iscrowd": 1, "area": float(box.sum()),
                            "segmentation": {"size": list(SIZE), "counts": [0, int(box.size)]}})
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path, annotations


def test_coco_polygons_and_rle_decode_to_the_object_masks(plain_dataset, tmp_path):
    records = check_plain(plain_dataset)
    path, annotations = _coco_file(tmp_path, records)
    coco = check_coco(path, plain_dataset / "images")
    assert len(coco) == len(records)
    for r in coco:
        masks, pickable = r.load_masks()
        assert pickable == [True, False]  # crowd regions are occupied, never picked
        assert masks[1].all()
    for ann in annotations[::2]:
        decoded = decode_segmentation(ann["segmentation"], SIZE)
        expected = np.array(ann["expected"])
        if isinstance(ann["segmentation"], list):  # pycocotools rasterises the polygon's outline inclusively
            assert (decoded & expected).sum() / (decoded | expected).sum() > 0.8
        else:
            assert np.array_equal(decoded, expected)


@pytest.mark.parametrize("how", ["missing image", "unknown image id", "no segmentation", "size differs"])
def test_a_bad_coco_dataset_is_one_error_naming_the_file(plain_dataset, tmp_path, how):
    path, _ = _coco_file(tmp_path, check_plain(plain_dataset))
    data = json.loads(path.read_text())
    named = str(path)
    if how == "missing image":
        data["images"][0]["file_name"] = "gone.jpg"
        named = str(plain_dataset / "images" / "gone.jpg")
    elif how == "unknown image id":
        data["annotations"][0]["image_id"] = 999
    elif how == "no segmentation":
        data["annotations"][0]["segmentation"] = []
    else:
        data["images"][0]["width"] += 1
        named = data["images"][0]["file_name"]
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as e:
        check_coco(path, plain_dataset / "images")
    assert named in str(e.value)
