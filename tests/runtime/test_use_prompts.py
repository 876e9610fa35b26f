"""RepositionPipeline.use_prompts: a pipeline that has already run switches to another prompts file and then renders
exactly as a pipeline loaded with that file in its weights folder (no prompt embedding survives the switch)."""
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from editrt.runtime.reposition import RepositionPipeline


def test_use_prompts_after_a_run_equals_loading_the_file(tiny_weights, photo, tmp_path):
    rgb = np.ascontiguousarray(photo[100:164, 150:214])
    mask = np.zeros((64, 64), bool)
    mask[20:40, 10:30] = True
    base = load_file(str(tiny_weights / "task_prompts.safetensors"))
    other = {**base, "complete": torch.randn(base["null"].shape, generator=torch.Generator().manual_seed(3))}
    folder = tmp_path / "weights"
    shutil.copytree(tiny_weights, folder)
    save_file(other, str(folder / "task_prompts.safetensors"))

    pipe = RepositionPipeline.from_pretrained(tiny_weights)
    before = np.asarray(pipe.inpaint(rgb, mask, "complete", steps=2, guidance=2.0, resolution=64))
    pipe.use_prompts(folder / "task_prompts.safetensors")
    after = np.asarray(pipe.inpaint(rgb, mask, "complete", steps=2, guidance=2.0, resolution=64))
    loaded = RepositionPipeline.from_pretrained(folder)
    np.testing.assert_array_equal(after, np.asarray(loaded.inpaint(rgb, mask, "complete", steps=2, guidance=2.0,
                                                                   resolution=64)))
    assert (after != before).any()
