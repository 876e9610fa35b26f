"""Typed edit requests (runtime/edits.py): validated once where they are built, errors name the attribute,
arrays held as read-only copies, the keyword form mapped in one place."""
import sys
import warnings

import numpy as np
import pytest

from editrt.errors import ElementsError, InputError
from editrt.runtime.edits import (
    DeleteElements,
    ElementsEdit,
    MoveElements,
    Quality,
    ResizeElements,
    SeeleEdit,
    seele_request,
)


@pytest.mark.parametrize("kwargs,field", [
    (dict(move=(1,)), "move"),
    (dict(move=(1, float("nan"))), "move"),
    (dict(scale=0.01), "scale"),
    (dict(scale="big"), "scale"),
    (dict(scale=True), "scale"),
    (dict(occlusion="maybe"), "occlusion"),
    (dict(occlusion=[[1, 0]]), "occlusion"),
    (dict(matting="yes"), "matting"),
    (dict(trimap_band=3), "trimap_band"),
    (dict(matting=True, trimap_band=0), "trimap_band"),
    (dict(dilation=-1), "dilation"),
    (dict(complete_mask="mask.png"), "complete_mask"),
    (dict(existing_shadow=3), "existing_shadow"),
    (dict(new_shadow_region=(0, 0, 4)), "new_shadow_region"),
    (dict(new_shadow_region=(0, 0, 4, 4), harmonize=False), "new_shadow_region"),
])
def test_seele_edit_refuses_bad_values_naming_the_attribute(kwargs, field):
    with pytest.raises(InputError) as e:
        SeeleEdit(**kwargs)
    assert e.value.field == field and str(e.value).startswith(field) and "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs,field", [
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(guidance=0.5), "guidance"),
    (dict(seed=-1), "seed"), (dict(resolution=60), "resolution"),
])
def test_quality_refuses_bad_values_naming_the_attribute(kwargs, field):
    with pytest.raises(InputError) as e:
        Quality(**kwargs)
    assert e.value.field == field


def test_masks_are_read_only_copies_and_values_normalised():
    mask = np.zeros((4, 6), bool)
    mask[1:3, 2:4] = True
    edit = SeeleEdit(move=[3, "4"], occlusion=mask, existing_shadow=mask, new_shadow_region=[0, 0, 2, 2])
    mask[:] = False  # the caller's array changes after the edit was built ...
    assert edit.occlusion.sum() == 4 and edit.existing_shadow.sum() == 4  # ... the edit's does not
    assert not edit.occlusion.flags.writeable and not edit.existing_shadow.flags.writeable
    assert edit.move == (3.0, 4.0) and edit.new_shadow_region == (0.0, 0.0, 2.0, 2.0)
    assert edit.occluder_mask is edit.occlusion and not edit.auto_occlusion and edit.nbytes() == 2 * mask.nbytes
    with pytest.raises(AttributeError):
        edit.scale = 2.0  # frozen


def test_the_keyword_form_maps_older_names_once():
    mask = np.ones((4, 6), bool)
    with pytest.warns(DeprecationWarning) as warned:  # each older spelling says what replaces it
        edit, quality = seele_request(None, None, dict(move=(1, 2), shadow_mask=mask, shadow_region=(0, 0, 2, 2),
                                                       occlusion="none", occluder_mask=mask, steps=3, seed=5))
    assert sorted(str(w.message).split("=")[0] for w in warned) == ["occluder_mask", "shadow_mask", "shadow_region"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the current names warn about nothing
        seele_request(None, None, dict(move=(1, 2), existing_shadow=mask, new_shadow_region=(0, 0, 2, 2)))
    assert edit.existing_shadow.all() and edit.new_shadow_region == (0, 0, 2, 2) and edit.occluder_mask.all()
    assert quality == Quality(steps=3, seed=5)
    with pytest.raises(InputError) as e:
        seele_request(None, None, dict(existing_shadow=mask, shadow_mask=mask))
    assert e.value.field == "existing_shadow"
    with pytest.raises(InputError) as e:
        seele_request(SeeleEdit(), None, dict(move=(1, 1)))
    assert e.value.field == "move"
    with pytest.raises(InputError) as e:
        seele_request(None, Quality(), dict(steps=2))
    assert e.value.field == "steps"
    with pytest.raises(TypeError, match="shadow_box"):
        seele_request(None, None, dict(shadow_box=(0, 0, 1, 1)))


def test_elements_edit_ops_are_typed_and_applied_in_order():
    with pytest.raises(InputError) as e:
        ElementsEdit(ops=[("move", 1)])
    assert e.value.field == "ops"
    with pytest.raises(InputError) as e:
        MoveElements(ids=(), dx=1)
    assert e.value.field == "ids"
    with pytest.raises(InputError) as e:
        ResizeElements(ids=1, scale=40)
    assert e.value.field == "scale"
    with pytest.raises(InputError) as e:
        ElementsEdit(prompt=3)
    assert e.value.field == "prompt"
    from editrt.runtime.elements import Elements

    labels = np.zeros((16, 16), np.int64)
    labels[:, 8:] = 1
    labels[8:, :8] = 2
    elements = Elements.from_labels(labels, np.ones((3, 4), np.float32), (16, 16), {})
    deleted = ElementsEdit(ops=(DeleteElements(ids=2), MoveElements(ids=0, dx=0, dy=0))).apply(elements)
    assert deleted == [2] and elements.alive.tolist() == [True, True, False]
    with pytest.raises(ElementsError) as e:
        ElementsEdit(ops=(MoveElements(ids=9, dx=1),)).apply(elements)
    assert e.value.field is not None


def test_importing_the_edit_types_needs_no_torch():
    import subprocess

    code = "import sys, editrt.runtime.edits; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
