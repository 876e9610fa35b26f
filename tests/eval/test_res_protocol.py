"""`editrt eval res`'s protocols reach the editor: `paper` runs SEELE's removal order and says so in its settings."""
import dataclasses

import numpy as np

from editrt.eval import res
from editrt.eval.datasets import ResTask


def test_paper_protocol_runs_and_records_the_paper_removal_order(reposition, photo):
    source = np.ascontiguousarray(photo[100:164, 150:214])
    subject = np.zeros((64, 64), bool)
    subject[20:40, 10:30] = True
    task = ResTask("p1", "1to2", source, subject, (16, 4), np.zeros((64, 64), bool), source)
    paper = res.settings_for("paper", None, 2, 1.0, 0, 64)
    assert paper.removal_order == "paper" and res.settings_for("editrt", None, 2, 1.0, 0, 64).removal_order == "cached"
    cached = dataclasses.replace(paper, removal_order="cached")  # the same protocol, the other order
    expected = reposition(source, mask=subject, move=(16, 4), harmonize=False, steps=2, resolution=64,
                          remove_order="paper").image
    np.testing.assert_array_equal(res.reposition(reposition, task, paper), np.asarray(expected))
    assert (res.reposition(reposition, task, paper) != res.reposition(reposition, task, cached)).any()
