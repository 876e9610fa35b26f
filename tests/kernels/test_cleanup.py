"""Native partition clean-up (kernels/csrc/, kernels/cleanup.py) against the scipy path, its oracle.

Every comparison is EXACT (labels, counts, boxes, and centroids bit for bit): the op is integer work
plus the same float64 finishing formula as slic.element_stats. Maps: random speckle and blocks,
SLIC superpixels of real photos with noise, the real partition of photos (tiny weights), and
adversarial maps (one-pixel elements, snakes and spirals, checkerboards, border elements, empty
elements, ties of equal pieces, all ids 0..255, non-square, odd and degenerate sizes), opening 0/1/2.

The native library is built by `pip install -e .`; its tests fail when it is missing (a broken
build must not pass as a skip) unless EDITRT_NATIVE=0 or EDITRT_NATIVE_BUILD=0 say it is off.
"""
import os
import warnings

import numpy as np
import pytest
import torch
from skimage import data, segmentation

from editrt.errors import InputError
from editrt.kernels import cleanup, launches, slic

OPENINGS = (0, 1, 2)


@pytest.fixture(scope="module")
def native():
    if os.environ.get("EDITRT_NATIVE") == "0" or os.environ.get("EDITRT_NATIVE_BUILD") == "0":
        pytest.skip("native ops switched off (EDITRT_NATIVE=0 / EDITRT_NATIVE_BUILD=0)")
    status = cleanup.native_status()
    assert status["cpu"], f"native CPU op not loaded: {status['error']}"
    return status


def assert_matches_oracle(labels: np.ndarray, n: int, opening: int, device="cpu"):
    """Native result == scipy result: labels, and the statistics == slic.element_stats_reference of them."""
    expected = cleanup.clean_labels_reference(labels, n, opening)
    got = cleanup.cleanup_native(torch.from_numpy(labels).to(device), n, opening)
    assert got.labels.device.type == torch.device(device).type
    got_labels = got.labels.cpu().numpy()
    if not np.array_equal(got_labels, expected):
        diff = np.argwhere(got_labels != expected)
        r, c = diff[0]
        raise AssertionError(f"{len(diff)} pixels differ (opening {opening}, N {n}, shape {labels.shape}); first at "
                             f"({r}, {c}): native {got_labels[r, c]}, scipy {expected[r, c]}")
    counts, centroids, boxes = slic.element_stats_reference(torch.from_numpy(expected), n)
    assert torch.equal(got.counts.cpu(), counts)
    assert torch.equal(got.boxes.cpu(), boxes)
    assert torch.equal(got.centroids.cpu().isnan(), centroids.isnan())
    assert torch.equal(got.centroids.cpu().nan_to_num(-7.0), centroids.nan_to_num(-7.0))
    return expected


# ---------------------------------------------------------------- map makers
def voronoi_map(h, w, n, rng, noise=0.01, dropped=0.002):
    """SLIC-like regions: nearest of n jittered grid points under a smooth warp, plus label noise from neighbours."""
    side = int(np.ceil(np.sqrt(n)))
    gy, gx = np.divmod(np.arange(n), side)
    pts = np.stack([(gx + rng.uniform(0.2, 0.8, n)) * w / side, (gy + rng.uniform(0.2, 0.8, n)) * h / side], 1)
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    yy += 3 * np.sin(xx / 7 + rng.uniform(0, 6))  # wiggly boundaries
    xx += 3 * np.cos(yy / 5 + rng.uniform(0, 6))
    d = (xx[..., None] - pts[:, 0]) ** 2 + (yy[..., None] - pts[:, 1]) ** 2
    labels = d.argmin(-1).astype(np.int64)
    flip = rng.random((h, w)) < noise  # islands: a pixel takes the label of a pixel a few steps away
    src_y = np.clip(np.arange(h)[:, None] + rng.integers(-4, 5, (h, w)), 0, h - 1)
    src_x = np.clip(np.arange(w)[None, :] + rng.integers(-4, 5, (h, w)), 0, w - 1)
    labels[flip] = labels[src_y, src_x][flip]
    labels[rng.random((h, w)) < dropped] = -1
    return labels


def spiral(cells: int, width: int) -> np.ndarray:
    """Element 0: a square spiral path of `width`-pixel cells on a cells x cells grid; element 1 between turns."""
    path = np.zeros((cells, cells), bool)
    r, c, dr, dc = 0, 0, 0, 1
    path[0, 0] = True
    while True:
        for _ in range(2):  # forward if the cell ahead is free and the one after it is not path; else turn right
            r1, c1, r2, c2 = r + dr, c + dc, r + 2 * dr, c + 2 * dc
            inside2 = 0 <= r2 < cells and 0 <= c2 < cells
            if 0 <= r1 < cells and 0 <= c1 < cells and not path[r1, c1] and not (inside2 and path[r2, c2]):
                path[r1, c1] = True
                r, c = r1, c1
                break
            dr, dc = dc, -dr
        else:
            break
    return np.kron(np.where(path, 0, 1), np.ones((width, width), np.int64))


def snake(h: int, w: int, width: int) -> np.ndarray:
    """Element 0: a boustrophedon, `width`-pixel bands joined at alternating ends (one piece, long chain)."""
    labels = np.full((h, w), 1, np.int64)
    for k, top in enumerate(range(0, h, 2 * width)):
        labels[top:top + width, :] = 0
        joint = slice(w - width, w) if k % 2 == 0 else slice(0, width)
        labels[top + width:top + 2 * width, joint] = 0
    return labels


# ---------------------------------------------------------------- oracle equality
@pytest.mark.parametrize("opening", OPENINGS)
def test_random_maps_equal_scipy(native, opening):
    rng = np.random.default_rng(opening)
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(1, 48, 2))
        n = int(rng.integers(1, 20))
        if trial % 3 == 0:  # speckle: many tiny pieces, ties everywhere
            labels = rng.integers(-1, n, (h, w))
        else:  # blocks of 2..4 pixels: pieces that survive the opening and touch each other
            b = int(rng.integers(2, 5))
            labels = np.kron(rng.integers(-1, n, (h // b + 1, w // b + 1)), np.ones((b, b), np.int64))[:h, :w].copy()
        assert_matches_oracle(labels, n, opening)


@pytest.mark.parametrize("opening", OPENINGS)
def test_slic_like_maps_equal_scipy(native, opening):
    rng = np.random.default_rng(10 + opening)
    for h, w, n in [(128, 128, 64), (97, 131, 50), (160, 90, 256)]:
        assert_matches_oracle(voronoi_map(h, w, n, rng), n, opening)


@pytest.mark.parametrize("photo", ["astronaut", "coffee", "chelsea"])
def test_superpixels_of_real_photos_equal_scipy(native, photo):
    """SLIC superpixels (scikit-image) of a real photo, relabelled into 256 ids with a few ids unused, plus noise."""
    image = getattr(data, photo)()[::2, ::2]  # non-square, odd sizes for chelsea/coffee
    segments = segmentation.slic(image, n_segments=240, compactness=10, start_label=0).astype(np.int64)
    rng = np.random.default_rng(3)
    ids = rng.permutation(256)[:segments.max() + 1]  # a random id per superpixel, some ids absent
    labels = ids[segments]
    labels[rng.random(labels.shape) < 0.003] = -1
    for opening in OPENINGS:
        assert_matches_oracle(labels, 256, opening)


def test_real_partition_native_equals_scipy_path(native, elements_pipe, monkeypatch):
    """The whole partition of real photos (tiny weights): native clean-up vs EDITRT_NATIVE=0, all outputs."""
    from editrt.runtime.partition import partition

    for name, size in [("astronaut", 320), ("chelsea", 192)]:
        rgb = elements_pipe.working_image(getattr(data, name)(), resolution=size)
        with launches.track() as seen:
            ours = partition(elements_pipe.segmenter, rgb)
        assert "cleanup_labels_cpu" in seen.names
        monkeypatch.setenv("EDITRT_NATIVE", "0")
        with launches.track() as seen:
            theirs = partition(elements_pipe.segmenter, rgb)
        monkeypatch.delenv("EDITRT_NATIVE")
        assert "cleanup_labels_cpu" not in seen.names
        np.testing.assert_array_equal(ours.labels, theirs.labels)
        np.testing.assert_array_equal(ours.counts, theirs.counts)
        np.testing.assert_array_equal(ours.boxes, theirs.boxes)
        np.testing.assert_array_equal(ours.centroids, theirs.centroids)  # NaN == NaN for empty elements here
        assert ours.dropped_fraction == theirs.dropped_fraction


ADVERSARIAL = {
    "one-pixel elements": lambda: np.arange(49, dtype=np.int64).reshape(7, 7) % 13,
    "isolated pixels in a sea": lambda: np.where(np.indices((21, 17)).sum(0) % 5 == 0, 2, 0).astype(np.int64),
    "checkerboard 1px": lambda: (np.indices((16, 23)).sum(0) % 2).astype(np.int64),
    "checkerboard 2px": lambda: ((np.indices((16, 24)) // 2).sum(0) % 2).astype(np.int64),
    "checkerboard 3px, 4 ids": lambda: ((np.indices((31, 30)) // 3).sum(0) % 4).astype(np.int64),
    "snake 1px": lambda: snake(63, 40, 1),
    "snake 3px": lambda: snake(90, 37, 3),
    "spiral 1px": lambda: spiral(61, 1),
    "spiral 2px, odd": lambda: spiral(23, 2)[:-1],
    "spiral 3px": lambda: spiral(33, 3),
    "U shapes merged late": lambda: np.pad(np.kron(np.array([[0, 1, 0, 1, 0], [0, 1, 0, 1, 0], [0, 0, 0, 0, 0]]),
                                                   np.ones((4, 4), np.int64)), 1, constant_values=1),
    "all -1": lambda: np.full((9, 11), -1, np.int64),
    "one element everywhere": lambda: np.zeros((13, 8), np.int64),
    "1 x W": lambda: np.array([[0, 0, 0, 1, 1, -1, 0, 0, 2]], np.int64),
    "H x 1": lambda: np.array([[0], [0], [1], [1], [1], [0]], np.int64),
    "1 x 1": lambda: np.zeros((1, 1), np.int64),
    "2 x 2": lambda: np.array([[0, 1], [1, 1]], np.int64),
}


@pytest.mark.parametrize("opening", OPENINGS)
@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_maps_equal_scipy(native, name, opening):
    labels = ADVERSARIAL[name]()
    assert_matches_oracle(labels, int(labels.max()) + 3, opening)  # + empty elements past the last id


def test_long_chains_survive_whole(native):
    """A 1-px snake with no opening is one piece of every pixel: no propagation limit cuts it."""
    labels = snake(255, 64, 1)
    out = assert_matches_oracle(labels, 2, 0)
    assert (out == 0).sum() == (labels == 0).sum()


@pytest.mark.parametrize("opening", [0, 1])
def test_ties_go_to_the_first_piece_in_raster_order(native, opening):
    """Two equal pieces: the one whose first pixel comes first in raster order wins, not the leftmost box."""
    labels = np.ones((12, 14), np.int64)
    labels[1:4, 9:12] = 0  # piece A: first pixel (1, 9)
    labels[2:5, 1:4] = 0  # piece B: same size, further left but one row lower
    out = assert_matches_oracle(labels, 2, opening)
    assert (out[1:4, 9:12] == 0).all() and (out[2:5, 1:4] == -1).all()
    labels[1, 9] = 1  # A loses a corner pixel; with opening 0, B is now larger
    out = assert_matches_oracle(labels, 2, opening)
    if opening == 0:
        assert (out[2:5, 1:4] == 0).all()


def test_border_handling_of_the_opening(native):
    """Elements touching the image border erode from the border (scipy's border_value=0), not from the crop."""
    labels = np.zeros((10, 12), np.int64)
    labels[3:7, 4:9] = 1  # interior box of element 1: survives whole
    labels[:, :2] = 2  # a 2-px band on the left border: no 3x3 window fits inside the image -> gone
    labels[7:, 9:] = 3  # 3x3 corner block: survives
    out = assert_matches_oracle(labels, 4, 1)
    assert (out[3:7, 4:9] == 1).all() and (out == 2).sum() == 0 and (out[7:, 9:] == 3).all()


def test_every_id_present(native):
    rng = np.random.default_rng(5)
    labels = voronoi_map(96, 160, 256, rng, noise=0.02)
    labels.reshape(-1)[:256] = np.arange(256)  # every id 0..255 at least once
    for opening in OPENINGS:
        assert_matches_oracle(labels, 256, opening)


def test_degenerate_sizes(native):
    for shape in [(0, 5), (5, 0), (0, 0)]:
        labels = np.zeros(shape, np.int64)
        got = cleanup.cleanup_native(torch.from_numpy(labels), 3, 1)
        assert got.labels.shape == shape and (got.counts == 0).all() and (got.boxes == -1).all()
        np.testing.assert_array_equal(got.labels.numpy(), cleanup.clean_labels_reference(labels, 3, 1))
    got = cleanup.cleanup_native(torch.full((4, 4), -1, dtype=torch.int64), 0, 1)  # no elements at all
    assert (got.labels == -1).all() and got.counts.shape == (0,)


def test_non_contiguous_input(native):
    rng = np.random.default_rng(8)
    labels = voronoi_map(64, 80, 30, rng)
    view = torch.from_numpy(labels).t()  # a transposed view, strides (1, 64)
    got = cleanup.cleanup_native(view, 30, 1)
    np.testing.assert_array_equal(got.labels.numpy(), cleanup.clean_labels_reference(np.ascontiguousarray(labels.T),
                                                                                     30, 1))


def test_meta_shapes(native):
    """The Meta kernel (torch.compile, fake tensors) gives the real op's shapes and dtypes."""
    labels = torch.empty(37, 52, dtype=torch.int64, device="meta")
    out, stats = torch.ops.editrt_native.cleanup_labels(labels, 19, 2)
    real_out, real_stats = torch.ops.editrt_native.cleanup_labels(torch.zeros(37, 52, dtype=torch.int64), 19, 2)
    assert out.device.type == "meta" and (out.shape, out.dtype) == (real_out.shape, real_out.dtype)
    assert (stats.shape, stats.dtype) == (real_stats.shape, real_stats.dtype) == ((19, 7), torch.int64)


# ---------------------------------------------------------------- bad input
BAD = [
    (lambda: torch.zeros(4, 4, dtype=torch.float32), 3, 1, "int64"),
    (lambda: torch.zeros(4, 4, dtype=torch.int32), 3, 1, "int64"),
    (lambda: torch.zeros(2, 4, 4, dtype=torch.int64), 3, 1, "2-D"),
    (lambda: torch.zeros(4, dtype=torch.int64), 3, 1, "2-D"),
    (lambda: torch.full((4, 4), 3, dtype=torch.int64), 3, 1, r"\[-1, num_elements = 3\)"),
    (lambda: torch.full((4, 4), -2, dtype=torch.int64), 3, 1, r"\[-1, num_elements = 3\)"),
    (lambda: torch.zeros(4, 4, dtype=torch.int64), -1, 1, "num_elements"),
    (lambda: torch.zeros(4, 4, dtype=torch.int64), 3, -1, "opening"),
]


@pytest.mark.parametrize("make, n, opening, message", BAD)
def test_bad_input_raises_value_error_on_every_path(native, make, n, opening, message, monkeypatch):
    with pytest.raises(ValueError, match=message):
        cleanup.cleanup(make(), n, opening)
    monkeypatch.setenv("EDITRT_NATIVE", "0")
    with pytest.raises(ValueError, match=message):
        cleanup.cleanup(make(), n, opening)


@pytest.mark.parametrize("make, n, opening, message", BAD)
def test_the_op_itself_checks_its_input(native, make, n, opening, message):
    """Called directly (torch.ops), the op raises ValueError with a clear message, never crashes."""
    with pytest.raises(ValueError, match=message):
        torch.ops.editrt_native.cleanup_labels(make(), n, opening)


def test_out_of_range_message_names_the_pixel(native):
    labels = torch.zeros(5, 6, dtype=torch.int64)
    labels[3, 4] = 9
    with pytest.raises(ValueError, match=r"found 9 at row 3, column 4"):
        torch.ops.editrt_native.cleanup_labels(labels, 4, 1)


@pytest.mark.parametrize("value", [2**32 + 5, -(2**32) + 5, 2**63 - 1, -(2**63)])
def test_int64_labels_that_alias_a_valid_id_in_32_bits_are_rejected(native, value):
    """The CPU op range-checks in 32-bit halves; a value whose low word is a valid id must still be refused."""
    labels = torch.zeros(8, 9, dtype=torch.int64)
    labels[3, 4] = value
    with pytest.raises(ValueError, match=r"row 3, column 4"):
        torch.ops.editrt_native.cleanup_labels(labels, 256, 1)


def test_partition_clean_labels_raises_input_error(native):
    from editrt.runtime.partition import clean_labels

    with pytest.raises(InputError, match=r"\[-1, num_elements = 2\)"):
        clean_labels(np.full((3, 3), 5, np.int64), 2)
    with pytest.raises(InputError, match="integer"):
        clean_labels(np.zeros((3, 3), np.float32), 2)


# ---------------------------------------------------------------- dispatch and status
def test_switch_off_forces_the_scipy_path(native, monkeypatch):
    labels = torch.from_numpy(voronoi_map(40, 50, 20, np.random.default_rng(1)))
    with launches.track() as seen:
        on = cleanup.cleanup(labels, 20, 1)
    assert seen.names == ["cleanup_labels_cpu"]
    monkeypatch.setenv("EDITRT_NATIVE", "0")
    assert cleanup.native_status() == {"cpu": False, "cuda": False, "error": "disabled by EDITRT_NATIVE=0"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switched off on purpose: no warning
        with launches.track() as seen:
            off = cleanup.cleanup(labels, 20, 1)
    assert seen.names == []
    assert torch.equal(on.labels, off.labels) and torch.equal(on.counts, off.counts)


def test_status_keys(native):
    status = cleanup.native_status()
    assert set(status) == {"cpu", "cuda", "error"}
    assert isinstance(status["cpu"], bool) and isinstance(status["cuda"], bool)
    assert (status["error"] is None) == status["cuda"]


def test_missing_library_warns_once_in_one_line(monkeypatch):
    """No built library: the scipy path runs, with one one-line warning at first use."""
    monkeypatch.delenv("EDITRT_NATIVE", raising=False)
    monkeypatch.setattr(cleanup, "library_path", lambda: None)
    monkeypatch.setattr(cleanup, "_loaded", {})
    monkeypatch.setattr(cleanup, "_warned", set())
    labels = torch.from_numpy(voronoi_map(30, 30, 9, np.random.default_rng(2)))
    with pytest.warns(RuntimeWarning) as caught:
        first = cleanup.cleanup(labels, 9, 1)
        cleanup.cleanup(labels, 9, 1)
    assert len(caught) == 1 and "\n" not in str(caught[0].message) and "scipy" in str(caught[0].message)
    assert cleanup.native_status()["error"].startswith("no native library built")
    np.testing.assert_array_equal(first.labels.numpy(), cleanup.clean_labels_reference(labels.numpy(), 9, 1))


# ---------------------------------------------------------------- CUDA
@pytest.mark.gpu
def test_cuda_op_equals_scipy(native):
    assert native["cuda"], f"native CUDA op not loaded: {native['error']}"
    rng = np.random.default_rng(21)
    maps = [voronoi_map(512, 512, 256, rng), voronoi_map(97, 131, 50, rng), rng.integers(-1, 7, (33, 45))]
    maps += [ADVERSARIAL[name]() for name in ADVERSARIAL if 0 not in ADVERSARIAL[name]().shape]
    for labels in maps:
        for opening in OPENINGS:
            assert_matches_oracle(labels, int(labels.max()) + 2, opening, device="cuda")


@pytest.mark.gpu
def test_cuda_stays_on_device_and_records(native):
    labels = torch.from_numpy(voronoi_map(128, 128, 64, np.random.default_rng(4))).cuda()
    with launches.track() as seen:
        got = cleanup.cleanup(labels, 64, 1)
    assert seen.names == ["cleanup_labels_cuda"]
    assert all(t.is_cuda for t in (got.labels, got.counts, got.centroids, got.boxes))
    bad = labels.clone()
    bad[5, 7] = 64
    with pytest.raises(ValueError, match=r"\[-1, num_elements = 64\)"):
        cleanup.cleanup(bad, 64, 1)
    assert cleanup.cleanup(labels, 64, 1).labels.is_cuda  # the context survived the bad input


@pytest.mark.gpu
def test_cuda_partition_cleans_on_the_device(native, tiny_weights, monkeypatch):
    """On CUDA the partition's clean-up is the native CUDA op (labels stay on the GPU), equal to the scipy path."""
    from editrt.runtime.elements_pipeline import ElementsPipeline
    from editrt.runtime.partition import partition

    pipe = ElementsPipeline.from_pretrained(tiny_weights, device="cuda")
    rgb = pipe.working_image(data.astronaut(), resolution=512)
    with launches.track() as seen:
        ours = partition(pipe.segmenter, rgb)
    assert "cleanup_labels_cuda" in seen.names and "cleanup_labels_cpu" not in seen.names
    monkeypatch.setenv("EDITRT_NATIVE", "0")
    theirs = partition(pipe.segmenter, rgb)
    np.testing.assert_array_equal(ours.labels, theirs.labels)
    np.testing.assert_array_equal(ours.counts, theirs.counts)
    np.testing.assert_array_equal(ours.boxes, theirs.boxes)
    np.testing.assert_array_equal(ours.centroids, theirs.centroids)
