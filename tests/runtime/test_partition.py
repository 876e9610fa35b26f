"""Partition (paper 001 Algorithm 2) on real photos, its clean-up, and the batched SAM grid decode."""
import numpy as np
import pytest
import torch
from scipy import ndimage
from segment_anything import SamPredictor
from skimage import data

from editrt.runtime.partition import clean_labels, grid_points, partition


@pytest.mark.parametrize("photo_name", ["astronaut", "coffee"])
def test_partition_invariants_on_real_photos(elements_pipe, photo_name):
    image = getattr(data, photo_name)()
    rgb = elements_pipe.working_image(image, resolution=512)  # the paper's 512 working size
    part = partition(elements_pipe.segmenter, rgb)
    labels = part.labels
    assert labels.shape == rgb.shape[:2]
    # every pixel in exactly one element or dropped (-1); at most 256 elements
    assert labels.min() >= -1 and labels.max() < 256
    present = np.unique(labels[labels >= 0])
    assert 0 < len(present) <= 256
    # each element is one connected region
    for n in present:
        _, pieces = ndimage.label(labels == n)
        assert pieces == 1, f"element {n} has {pieces} pieces"
    # the dropped share is reported, and small (the paper sees ~0.1%)
    assert part.dropped_fraction == pytest.approx((labels < 0).mean())
    assert part.dropped_fraction <= 0.01
    # reported statistics describe the final labels
    for n in present[:20]:
        rows, cols = np.nonzero(labels == n)
        assert part.counts[n] == len(rows)
        np.testing.assert_array_equal(part.boxes[n], [cols.min(), rows.min(), cols.max(), rows.max()])
        np.testing.assert_allclose(part.centroids[n], [(cols.mean() + 0.5) / labels.shape[1],
                                                       (rows.mean() + 0.5) / labels.shape[0]], rtol=1e-6)


def test_grid_points_row_major_cell_centres():
    q = grid_points(16)
    assert q.shape == (256, 2)
    np.testing.assert_allclose(q[0], [1 / 32, 1 / 32])
    np.testing.assert_allclose(q[1], [3 / 32, 1 / 32])  # id = row * 16 + column
    np.testing.assert_allclose(q[16], [1 / 32, 3 / 32])


def test_clean_labels_opening_and_largest_piece():
    labels = np.zeros((20, 20), np.int64)
    labels[:, 10:] = 1
    labels[2:6, 2:6] = 2  # element 2: a 4x4 square ...
    labels[15:17, 15:17] = 2  # ... and a 2x2 island inside element 1: not its largest piece
    labels[10, :10] = 3  # element 3: a 1-pixel-wide line, removed by the opening
    out = clean_labels(labels, 4)
    assert (out[2:6, 2:6] == 2).all() and (out[15:17, 15:17] == -1).all()
    assert (out == 3).sum() == 0
    assert set(np.unique(out)) == {-1, 0, 1, 2}
    # nothing is ever relabelled to another element
    assert ((out == labels) | (out == -1)).all()


def test_grid_logits_match_sam_predictor_per_point(elements_pipe):
    image = data.coffee()[:, :500]  # non-square: SAM pads to a square; logits must cover only the image
    segmenter = elements_pipe.segmenter
    points = np.array([[30.5, 40.5], [250.0, 200.0], [480.0, 380.0]])
    ours = segmenter.grid_logits(image, points)
    predictor = SamPredictor(elements_pipe.components.sam)
    predictor.set_image(image)
    for n, point in enumerate(points):
        _, iou, low_res = predictor.predict(point_coords=point[None], point_labels=np.array([1]), multimask_output=True)
        best = low_res[int(np.argmax(iou))]
        valid = best[:ours.shape[1], :ours.shape[2]]
        # batched (3 queries) vs single decode: the same math, fp32 summation order may differ
        np.testing.assert_allclose(ours[n].numpy(), valid, rtol=1e-4, atol=1e-4)
    size = segmenter.image_size
    h, w = segmenter.transform.get_preprocess_shape(400, 500, size)  # the image inside SAM's padded square
    low = low_res.shape[-1]
    assert ours.shape[1:] == (round(h * low / size), round(w * low / size)) and w == size


def test_partition_iterations_and_beta(elements_pipe):
    """T > 1 re-queries SAM at the new centroids; beta = 0 (no distance term) still yields a valid partition."""
    rgb = elements_pipe.working_image(data.chelsea(), resolution=128)
    for kwargs in (dict(iterations=2), dict(beta=0.0), dict(grid=8)):
        part = partition(elements_pipe.segmenter, rgb, **kwargs)
        assert part.labels.max() < (kwargs.get("grid", 16)) ** 2
        assert torch.is_tensor(part.labels) is False and part.labels.dtype == np.int64
