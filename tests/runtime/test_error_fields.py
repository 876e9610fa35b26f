"""Bad input through the public API names its input in `EditError.field` (issue 23): front ends read the
field instead of parsing the message. Each case fails in the input checks, before any network runs."""
import pickle

import numpy as np
import pytest

from editrt.errors import EditError, InputError

H, W = 64, 96


def rgb():
    return np.full((H, W, 3), 120, np.uint8)


def mask():
    m = np.zeros((H, W), bool)
    m[20:40, 30:50] = True
    return m


REPOSITION_CASES = {
    "points": dict(points=[(W + 5, 3)]),
    "labels": dict(points=[(5, 5)], labels=[7]),
    "box": dict(box=(50, 10, 20, 30)),
    "mask": dict(mask=np.zeros((H + 1, W), bool)),
    "move": dict(mask=mask(), move="left"),
    "scale": dict(mask=mask(), scale=0.0),
    "occlusion": dict(mask=mask(), occlusion="sometimes"),
    "existing_shadow": dict(mask=mask(), existing_shadow=np.zeros((H, W), bool)),
    "new_shadow_region": dict(mask=mask(), harmonize=False, new_shadow_region=(0, 0, 4, 4)),
    "trimap_band": dict(mask=mask(), trimap_band=3),
    "steps": dict(mask=mask(), steps=0),
    "guidance": dict(mask=mask(), guidance=0.5),
    "complete_mask": dict(mask=mask(), complete_mask=np.zeros((H, W), bool)),
    "image": dict(image=np.zeros((H, W, 3), np.float32), mask=mask()),
}


@pytest.mark.parametrize("field", list(REPOSITION_CASES))
def test_reposition_errors_name_their_field(reposition, field):
    kwargs = dict(REPOSITION_CASES[field])
    image = kwargs.pop("image", rgb())
    with pytest.raises(InputError) as e:
        reposition(image, steps=kwargs.pop("steps", 1), **kwargs)
    assert e.value.field == field, str(e.value)


def test_new_shadow_region_box_outside_the_image_names_new_shadow_region(reposition):
    with pytest.raises(InputError) as e:
        reposition(rgb(), mask=mask(), steps=1, new_shadow_region=(W + 1, 0, W + 9, 8))
    assert e.value.field == "new_shadow_region"
    with pytest.raises(InputError) as e:  # the older keyword names the same attribute
        reposition(rgb(), mask=mask(), steps=1, occlusion="auto", occluder_mask=mask())
    assert e.value.field == "occlusion"


def test_inpaint_task_and_partition_options(reposition, elements_pipe):
    with pytest.raises(InputError) as e:
        reposition.inpaint(rgb(), mask(), task="harmonize", steps=1)
    assert e.value.field == "task"
    with pytest.raises(InputError) as e:
        elements_pipe.partition(rgb(), beta_c=2.0)
    assert e.value.field == "beta_c"
    with pytest.raises(InputError) as e:
        elements_pipe.partition(rgb(), grid=0)
    assert e.value.field == "grid"


def test_outpaint_and_session_fields(reposition):
    from editrt.runtime.outpaint import outpaint
    from editrt.runtime.session import EditSession

    with pytest.raises(InputError) as e:
        outpaint(reposition, rgb(), extend=(0, 0, 0, 0), steps=1)
    assert e.value.field == "extend"
    with pytest.raises(InputError) as e:
        outpaint(reposition, rgb(), extend=(8, 0, 0, 0), fill="plaid", steps=1)
    assert e.value.field == "fill"
    with pytest.raises(InputError) as e:
        EditSession(rgb(), object())
    assert e.value.field == "pipeline"


def test_field_defaults_to_none_and_survives_pickling():
    assert InputError("x").field is None
    err = pickle.loads(pickle.dumps(InputError("points: outside", field="points")))
    assert isinstance(err, EditError) and err.field == "points" and str(err) == "points: outside"


def test_loading_and_export_options_name_their_field(tiny_weights):
    from editrt.export.components import resolve_components
    from editrt.runtime.reposition import RepositionPipeline

    for kwargs, field in ((dict(backend="tensorrt"), "engines"), (dict(backend="mxnet"), "backend"),
                          (dict(device="tpu"), "device"), (dict(dtype="fp12"), "dtype")):
        with pytest.raises(InputError) as e:
            RepositionPipeline.from_pretrained(tiny_weights, **kwargs)
        assert e.value.field == field, str(e.value)
    with pytest.raises(InputError) as e:
        resolve_components(["sam"])
    assert e.value.field == "names"
