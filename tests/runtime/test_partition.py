"""Partition (paper 001 Algorithm 2) on real photos, its clean-up, and the batched SAM grid decode."""
import numpy as np
import pytest
from scipy import ndimage
from segment_anything import SamPredictor
from skimage import data

from editrt.runtime.partition import clean_labels, grid_points, partition
from editrt.runtime.segmenter import Segmenter

GRID = 16


@pytest.mark.parametrize("photo_name", ["astronaut", "coffee"])
def test_partition_invariants_on_real_photos(elements_pipe, photo_name):
    image = getattr(data, photo_name)()
    rgb = elements_pipe.working_image(image, resolution=512)  # the paper's 512 working size
    part = partition(elements_pipe.segmenter, rgb, grid=GRID)
    labels = part.labels
    assert labels.shape == rgb.shape[:2]
    # every pixel in exactly one element (the clean-up's dropped pixels go to a neighbour); at most GRID * GRID
    assert labels.min() >= 0 and labels.max() < GRID * GRID
    present = np.unique(labels[labels >= 0])
    assert 0 < len(present) <= GRID * GRID
    # each element is one connected region
    for n in present:
        _, pieces = ndimage.label(labels == n)
        assert pieces == 1, f"element {n} has {pieces} pieces"
    # the share the clean-up dropped (then gave to neighbours) is reported, and small (the paper sees ~0.1%)
    assert 0 <= part.dropped_fraction <= 0.01
    # reported statistics describe the final labels
    for n in present[:20]:
        rows, cols = np.nonzero(labels == n)
        assert part.counts[n] == len(rows)
        np.testing.assert_array_equal(part.boxes[n], [cols.min(), rows.min(), cols.max(), rows.max()])
        np.testing.assert_allclose(part.centroids[n], [(cols.mean() + 0.5) / labels.shape[1],
                                                       (rows.mean() + 0.5) / labels.shape[0]], rtol=1e-6)


def test_grid_points_row_major_cell_centres():
    q = grid_points(16)
    assert q.shape == (16 * 16, 2)
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


class CountingEngine:
    """Forwards every call to the real engine and records its inputs (the real network runs: not a mock)."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getattr__(self, name):  # spec, device, supports_cuda_graph, ...: the real engine's
        return getattr(self.real, name)

    def __call__(self, **inputs):
        self.calls.append({k: v.detach().clone() for k, v in inputs.items()})
        return self.real(**inputs)


def counting_segmenter(pipe):
    """A fresh Segmenter (empty embedding cache) over the pipeline's engines, SAM's two counted."""
    grid = CountingEngine(pipe.segmenter.engines["sam_mask_decoder_grid"])
    encoder = CountingEngine(pipe.segmenter.engines["sam_image_encoder"])
    engines = {**pipe.segmenter.engines, "sam_mask_decoder_grid": grid, "sam_image_encoder": encoder}
    return Segmenter(engines, pipe.segmenter.image_size, pipe.device), grid, encoder


@pytest.fixture(scope="module")
def working_chelsea(elements_pipe):
    rgb = elements_pipe.working_image(data.chelsea(), resolution=128)
    assert rgb.shape[:2] == (128, 192)
    return rgb


def test_each_iteration_requeries_sam_at_the_new_centroids(elements_pipe, working_chelsea):
    """Algorithm 2: iteration i queries the mask decoder at C_{i-1}; the image is encoded once."""
    rgb, (h, w) = working_chelsea, working_chelsea.shape[:2]
    grid_q = grid_points(GRID).numpy() * np.array([w, h], np.float32)  # C_0 = Q, pixels
    runs = {}
    for iterations in (1, 2, 3):
        segmenter, grid, encoder = counting_segmenter(elements_pipe)
        runs[iterations] = partition(segmenter, rgb, grid=GRID, iterations=iterations)
        assert len(grid.calls) == iterations  # one batched decoder call per iteration
        assert len(encoder.calls) == 1  # the embedding is cached across iterations
        frame = segmenter.transform.apply_coords(grid_q.astype(np.float64), (h, w))
        np.testing.assert_allclose(grid.calls[0]["point_coords"].cpu().numpy(), frame, rtol=1e-5)  # C_0 = Q
        for later in grid.calls[1:]:  # C_1, C_2: moved off the grid
            moved = np.abs(later["point_coords"].cpu().numpy() - frame).max(axis=1)
            assert (moved > 0.5).mean() > 0.5
    assert (runs[2].labels != runs[1].labels).mean() > 0.01  # the second query changed the assignment
    # C_1 is the centroid of iteration 1's labels: the elements' centroids of a T = 1 run are close to it
    segmenter, grid, _ = counting_segmenter(elements_pipe)
    partition(segmenter, rgb, grid=GRID, iterations=2)
    second = grid.calls[1]["point_coords"].cpu().numpy()
    present = runs[1].counts > 0
    t1_centroids = segmenter.transform.apply_coords(runs[1].centroids[present] * np.array([w, h]), (h, w))
    frame = segmenter.transform.apply_coords(grid_q.astype(np.float64), (h, w))[present]
    # the T = 1 output is cleaned, iteration 2 queried the raw labels' centroids: close, far closer than the grid
    to_centroids = np.median(np.linalg.norm(second[present] - t1_centroids, axis=1))
    to_grid = np.median(np.linalg.norm(second[present] - frame, axis=1))
    assert to_centroids < 0.25 * to_grid


def grid_cells(h: int, w: int, grid: int) -> np.ndarray:
    """Each pixel's grid cell id (row-major), from pixel centres: the Voronoi cells of the grid points."""
    rows = np.floor((np.arange(h) + 0.5) / h * grid).astype(np.int64)
    cols = np.floor((np.arange(w) + 0.5) / w * grid).astype(np.int64)
    return rows[:, None] * grid + cols[None, :]


def test_beta_weighs_distance_against_sam_scores(elements_pipe, working_chelsea):
    """beta_c = 0 makes the adjusted centroids the grid itself, so Eq. 1 is argmax_n [s(m, n) - beta d(m, Q_n)]:
    beta = 0 is SAM's scores alone; as beta grows each pixel's chosen query can only get nearer (the argmax
    of s - beta d has non-increasing d), and a large beta gives exactly the grid cells (independent oracle)."""
    rgb = working_chelsea
    h, w = rgb.shape[:2]
    cells = grid_cells(h, w, GRID)
    by_beta = {beta: partition(elements_pipe.segmenter, rgb, grid=GRID, beta=beta, beta_c=0.0).labels
               for beta in (0.0, 0.5, 2.0, 1e6)}
    np.testing.assert_array_equal(by_beta[1e6], cells)
    assert (by_beta[0.0] != by_beta[2.0]).mean() > 0.05

    def off_cell(labels):  # share of assigned pixels outside their element's own grid cell
        valid = labels >= 0
        return (labels[valid] != cells[valid]).mean()

    # tiny random SAM scores are flat, so small betas already matter; the order is what Eq. 1 implies
    assert off_cell(by_beta[0.0]) > off_cell(by_beta[0.5]) > off_cell(by_beta[2.0]) > off_cell(by_beta[1e6]) == 0.0
