"""`scale="auto"` for a subject cut by the image's bottom edge and moved down (issue 25 item 6): its feet are out of
frame, so the lowest visible row (the image's last) is its footpoint before and after the move. Depth maps are
known by construction: a ground whose inverse depth is row + column (nearer below and to the right)."""
import numpy as np
import pytest
from runtime_doubles import box_mask

from editrt.errors import InputError
from editrt.runtime import seele_stages as st


def tilted_ground(h=100, w=120):
    r, c = np.mgrid[:h, :w]
    return (r + c).astype(np.float32)


def test_a_subject_cut_by_the_bottom_edge_moved_down_scales_from_its_visible_bottom():
    depth = tilted_ground()
    subject = box_mask(depth.shape, 80, 100, 20, 40)  # rows 80..99: cut by the bottom edge
    # the last row under the subject (cols 20..39, median 99 + 29.5) and under its moved place (cols 50..69)
    expected = (99 + 59.5) / (99 + 29.5)
    # eps = 1e-3 x the largest inverse depth (218) shifts both medians by 0.218: relative error < 2e-3 here
    assert st.perspective_scale(depth, subject, dx=30, dy=10) == pytest.approx(expected, rel=2e-3)
    assert st.perspective_scale(depth, subject, dx=-20, dy=25) == pytest.approx((99 + 9.5) / (99 + 29.5), rel=2e-3)


def test_feet_in_view_moved_out_of_the_image_still_need_an_explicit_scale():
    depth = tilted_ground()
    with pytest.raises(InputError, match=r"scale auto: the moved subject's footpoint \(\d+, \d+\) is outside"):
        st.perspective_scale(depth, box_mask(depth.shape, 70, 90, 20, 40), dx=0, dy=15)
    with pytest.raises(InputError, match="outside the image"):  # cut by the bottom edge, but moved off the side
        st.perspective_scale(depth, box_mask(depth.shape, 80, 100, 20, 40), dx=200, dy=5)
    with pytest.raises(InputError, match="outside the image"):  # cut by the bottom edge, moved off the top
        st.perspective_scale(depth, box_mask(depth.shape, 80, 100, 20, 40), dx=0, dy=-120)


def test_reposition_scale_auto_moves_a_cut_subject_down(reposition, photo, monkeypatch):
    class KnownDepth:
        def __call__(self, rgb, trimap=None):
            return tilted_ground(64, 64)

    rgb = np.ascontiguousarray(photo[100:164, 150:214])
    subject = box_mask((64, 64), 44, 64, 10, 30)  # cut by the bottom edge
    monkeypatch.setattr(reposition, "depth_estimator", KnownDepth())
    result = reposition(rgb, mask=subject, move=(20, 6), scale="auto", harmonize=False, steps=1, resolution=64)
    # 1-row footpoint (5% of 20): row 63 under cols 10..29 (median 63 + 19.5) and under cols 30..49 (63 + 39.5)
    assert result.scale == pytest.approx((63 + 39.5) / (63 + 19.5), rel=2e-3)
    moved = result.stages["moved"].mask
    assert moved[63].any() and not moved[:, :25].any()  # the subject moved right, still cut by the bottom edge
