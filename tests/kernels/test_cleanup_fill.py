"""`cleanup.fill_dropped`: the pixels the partition's clean-up drops go to a neighbouring element.

Hand-made maps with the expected result worked out by hand, and clean-ups of SLIC-like maps (scipy
path) checked for the contract: every droppable pixel filled, kept pixels unchanged, each element still
one 4-connected piece, no element appears or disappears.
"""
import numpy as np
import pytest
import torch
from scipy import ndimage
from test_cleanup import voronoi_map  # tests/kernels is on sys.path (rootdir-relative imports)

from editrt.kernels import cleanup

CROSS = ndimage.generate_binary_structure(2, 1)


def test_rings_grow_from_the_lowest_labelled_neighbour():
    labels = torch.tensor([[0, 0, -1, 1, 1],
                           [0, -1, -1, -1, 1],
                           [2, 2, -1, 1, 1]])
    # ring 1: (0,2) sees 0 and 1 -> 0; (1,1) sees 0 and 2 -> 0; (1,3) -> 1; (2,2) sees 2 and 1 -> 1;
    # ring 2: (1,2) sees 0 (above, left) and 1 (below, right) -> 0
    expected = [[0, 0, 0, 1, 1],
                [0, 0, 0, 1, 1],
                [2, 2, 1, 1, 1]]
    given = labels.clone()
    assert cleanup.fill_dropped(labels).tolist() == expected
    assert torch.equal(labels, given)  # the input is not changed


def test_only_fillable_pixels_are_filled_and_grown_through():
    labels = torch.tensor([[0, -1, -1, -1, 1, -1]])
    fillable = torch.tensor([[True, False, True, False, True, True]])
    # (0,2) is walled in by pixels that may not be filled: no element reaches it
    assert cleanup.fill_dropped(labels, fillable).tolist() == [[0, -1, -1, -1, 1, 1]]


@pytest.mark.parametrize("labels", [torch.full((4, 6), -1), torch.zeros((0, 5), dtype=torch.int64),
                                    torch.zeros((3, 3), dtype=torch.int64)])
def test_nothing_to_grow_from_or_nothing_to_fill(labels):
    assert torch.equal(cleanup.fill_dropped(labels), labels)


@pytest.mark.parametrize("opening", [1, 2])
@pytest.mark.parametrize("shape", [(88, 120), (120, 88), (61, 200), (256, 256)])
def test_after_the_clean_up_every_pixel_has_an_element_and_each_element_one_piece(shape, opening):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1] + opening)
    raw = voronoi_map(*shape, 64, rng, noise=0.05, dropped=0.0)
    n = int(raw.max()) + 1
    cleaned = cleanup.clean_labels_reference(raw, n, opening)
    dropped = cleaned < 0
    assert dropped.mean() > 0.01  # the clean-up dropped something to fill
    filled = cleanup.fill_dropped(torch.from_numpy(cleaned)).numpy()
    assert (filled >= 0).all()
    np.testing.assert_array_equal(filled[~dropped], cleaned[~dropped])
    assert set(np.unique(filled)) == set(np.unique(cleaned[~dropped]))
    for element in np.unique(filled):
        assert ndimage.label(filled == element, structure=CROSS)[1] == 1, f"element {element} is split"
