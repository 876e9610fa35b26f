"""SEELE's pre/post-processing rules on hand-made scenes whose answer is known without the code."""
import numpy as np
import pytest
from runtime_doubles import box_mask, occlusion_scene

from editrt.errors import InputError
from editrt.runtime import seele_stages as st
from editrt.runtime.images import shift_or_warp


def scene():
    """A far wall (inverse depth 1), a near box (5) and the subject (2): depth order known by construction."""
    return occlusion_scene()


def test_occluder_is_exactly_where_the_destination_is_nearer():
    depth, box, subject = scene()
    occluder = st.occluder_from_depth(depth, subject)
    np.testing.assert_array_equal(occluder, box)  # the wall (farther) never hides, the subject never hides itself
    moved = np.roll(subject, 50, axis=1)  # lands half on the box, half on the wall
    hidden = moved & occluder
    assert hidden.sum() == 20 * 20 and np.array_equal(hidden, moved & box)
    # The rule needs no metric depth: any positive scale and any shift of inverse depth give the same mask.
    np.testing.assert_array_equal(st.occluder_from_depth(3.5 * depth - 7.0, subject), box)


def test_occlusion_margin_and_what_moves_with_the_subject():
    depth, box, subject = scene()
    # Normalised: wall 0, subject 0.25, box 1. Margin 0.05: 0.275 is the subject's own surface, 0.325 is in front.
    depth[0:10, 100:110] = 1.0 + 4 * 0.275
    depth[70:80, 100:110] = 1.0 + 4 * 0.325
    occluder = st.occluder_from_depth(depth, subject)
    assert not occluder[0:10, 100:110].any() and occluder[70:80, 100:110].all()
    shadow = box_mask(depth.shape, 70, 80, 100, 110)
    assert not st.occluder_from_depth(depth, subject, moves_with=shadow)[70:80, 100:110].any()
    assert not st.occluder_from_depth(np.full((8, 8), 3.0), box_mask((8, 8), 2, 4, 2, 4)).any()  # flat: none


def test_the_subject_never_hides_itself():
    depth, box, subject = scene()
    depth[40:50, 10:40] = 4.0  # its paws reach towards the camera: nearer than its median (2) by far
    occluder = st.occluder_from_depth(depth, subject)
    np.testing.assert_array_equal(occluder, box)  # the subject's old place is removed: it cannot hide the moved one


def test_subject_depth_is_robust_to_edge_pixels():
    depth, box, subject = scene()
    depth[20, 10:40] = 5.0  # SAM's top edge row touches something near: 30 of 900 pixels
    assert st.subject_depth(st.normalized_depth(depth), subject) == pytest.approx(0.25)


def ground(h=100, w=80):
    """A ground plane seen by a level pinhole camera: inverse depth grows linearly with the row below the
    horizon (row 0 here): inv_depth = row."""
    return np.repeat(np.arange(h, dtype=np.float32)[:, None], w, axis=1)


@pytest.mark.parametrize("bottom,dy,expected", [
    (79, -40, 39 / 79),   # moved up, away from the camera: half-size-ish
    (39, 20, 59 / 39),    # moved down, nearer: bigger
    (59, 0, 1.0),         # sideways on the same ground row: unchanged
])
def test_perspective_scale_is_the_footpoint_inverse_depth_ratio(bottom, dy, expected):
    depth = ground()
    subject = box_mask(depth.shape, bottom - 19, bottom + 1, 20, 40)  # 20 rows high: a 1-row footpoint
    scale = st.perspective_scale(depth, subject, dx=7, dy=dy)
    # eps = 1e-3 x the largest inverse depth (99) shifts both medians by 0.099: relative error < 3e-3 here
    assert scale == pytest.approx(expected, rel=3e-3)


def test_perspective_scale_is_clamped_and_needs_the_footpoint_inside():
    depth = ground()
    subject = box_mask(depth.shape, 80, 100, 20, 40)  # footpoint row 99
    assert st.perspective_scale(depth, subject, 0, -95) == 0.25  # 4/99 -> clamped up
    tiny = box_mask(depth.shape, 0, 4, 20, 40)  # footpoint row 3
    assert st.perspective_scale(depth, tiny, 0, 90) == 4.0  # 93/3 -> clamped down
    with pytest.raises(InputError, match=r"scale auto: the moved subject's footpoint .* outside the image"):
        st.perspective_scale(depth, box_mask(depth.shape, 70, 90, 20, 40), 0, 15)  # feet in view, moved out


def test_a_footpoint_moved_onto_the_subject_reads_the_ground_not_the_subject():
    """An upright subject (its own depth, 0.89, all over) dragged up by less than its height: the new
    footpoint lies on its own pixels; the ground there (rows 58-59: 0.68, 0.69) decides, as off the subject."""
    depth = np.repeat(0.1 + np.arange(100, dtype=np.float32)[:, None] / 100, 100, axis=1)  # ground plane
    subject = box_mask(depth.shape, 40, 80, 40, 60)
    depth[subject] = depth[79, 50]
    # medians of the 2-row footpoint bands: new (0.68 + 0.69) / 2 over old 0.89; eps 1e-3 x 0.99 on both
    assert st.perspective_scale(depth, subject, 0, -20) == pytest.approx(0.685 / 0.89, rel=3e-3)
    assert st.perspective_scale(depth, subject, 0, -20) == st.perspective_scale(depth, subject, 30, -20)


def test_footpoint_anchor_keeps_the_bottom_edge_where_the_move_puts_it():
    rgb = np.zeros((100, 80, 3), np.uint8)
    subject = box_mask((100, 80), 40, 80, 20, 40)  # bottom edge at 80
    for scale in (0.5, 1.5):
        dy = -10 + st.footpoint_anchor_dy(subject, scale)
        _, moved = shift_or_warp(rgb, subject, 3, dy, scale)
        assert np.nonzero(moved)[0].max() + 1 == 70  # 80 - 10: the feet stay where they were dropped


@pytest.mark.parametrize("width", [3, 5, 8, 11])
def test_the_default_trimap_band_fits_a_thin_subject(width):
    """No band given: the default (2% of 300 px = 6) narrows to the widest band that leaves a foreground,
    judged by trimap_from_mask itself (torch dilation), not by the formula; a wide subject keeps 6."""
    from editrt.runtime.estimators import trimap_from_mask

    thin = box_mask((300, 300), 100, 200, 100, 100 + width)
    band = st.default_trimap_band((300, 300), thin)
    assert 1 <= band < 6 and (trimap_from_mask(thin, band) == 255).any()
    with pytest.raises(InputError, match="larger than the subject"):
        trimap_from_mask(thin, band + 1)
    assert st.default_trimap_band((300, 300), box_mask((300, 300), 100, 200, 100, 140)) == 6
    assert st.default_trimap_band((300, 300)) == 6


def test_composite_against_a_hand_computed_blend():
    subject = np.array([[[200, 10, 0], [101, 255, 7]], [[0, 0, 0], [255, 255, 255]]], np.uint8)
    background = np.array([[[40, 250, 0], [0, 0, 8]], [[255, 255, 255], [10, 20, 30]]], np.uint8)
    alpha = np.array([[0.25, 0.5], [1.0, 0.0]], np.float32)
    # by hand: 0.25*200 + 0.75*40 = 80; 0.25*10 + 0.75*250 = 190; 0.5*101 = 50.5 -> 51 (half up);
    # 0.5*255 = 127.5 -> 128; 0.5*7 + 0.5*8 = 7.5 -> 8; alpha 1 -> the subject; alpha 0 -> the background
    expected = np.array([[[80, 190, 0], [51, 128, 8]], [[0, 0, 0], [10, 20, 30]]], np.uint8)
    np.testing.assert_array_equal(st.composite(subject, background, alpha), expected)


def test_refine_alpha_imposes_the_known_trimap_regions():
    trimap = np.array([[0, 128, 255]], np.uint8)
    np.testing.assert_array_equal(st.refine_alpha(np.array([[0.25, 0.25, 0.25]]), trimap), [[0.0, 0.25, 1.0]])
    np.testing.assert_array_equal(st.refine_alpha(np.array([[-1.0, 2.0, 0.9]]), trimap), [[0.0, 1.0, 1.0]])


@pytest.mark.parametrize("dx,dy,scale", [(5, -3, 1.0), (4.5, 2.0, 1.0), (3, 1, 1.3), (-2, 6, 0.7)])
def test_alpha_moves_exactly_like_the_subject(dx, dy, scale):
    rgb = np.zeros((60, 70, 3), np.uint8)
    subject = box_mask((60, 70), 15, 40, 20, 45)
    subject[15:20, 20:25] = False
    _, moved = shift_or_warp(rgb, subject, dx, dy, scale)
    np.testing.assert_array_equal(st.move_values(subject.astype(np.float32), subject, dx, dy, scale) >= 0.5, moved)


def test_regions_from_masks_or_boxes_clipped_to_the_image():
    region = st.as_region((100, -5, 130, 10), (80, 120), "shadow_region")
    assert region.sum() == 20 * 10 and region[0:10, 100:120].all()
    with pytest.raises(InputError, match=r"shadow_region box \(130, 0, 150, 10\): empty after clipping"):
        st.as_region((130, 0, 150, 10), (80, 120), "shadow_region")
    with pytest.raises(InputError, match="shadow_region: size 120x79 differs"):
        st.as_region(np.ones((79, 120), bool), (80, 120), "shadow_region")
    with pytest.raises(InputError, match="shadow_region: expected a mask or a box"):
        st.as_region((1, 2, 3), (80, 120), "shadow_region")
    for bad in ((float("nan"), 0, 10, 10), (0, 0, float("inf"), 10)):
        with pytest.raises(InputError, match="shadow_region box .*: expected finite pixel coordinates"):
            st.as_region(bad, (80, 120), "shadow_region")


def test_depth_png_is_16_bit_normalised():
    depth, _, _ = scene()
    png = st.depth_png(depth)
    assert png.dtype == np.uint16 and png.max() == 65535 and png.min() == 0
    assert png[25, 20] == round(0.25 * 65535)  # the subject at 2 on [1, 5]
