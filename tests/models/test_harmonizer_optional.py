"""No harmonizer LoRA file: harmonize runs the base UNet (c = 0), said once on stderr (issue #16).

Tolerance: exact. Without LoRA layers the harmonizer engine runs the very same UNet weights the
c = 0 pass of a directory with a LoRA runs, so results are bit-identical.
"""
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest

from editrt.errors import WeightsError
from editrt.runtime.reposition import RepositionPipeline

MESSAGE = "harmonizer_lora.safetensors: missing; harmonize runs the base UNet (LoRA scale c = 0)"


@pytest.fixture
def no_lora(tiny_weights, tmp_path):
    folder = shutil.copytree(tiny_weights, tmp_path / "w")
    (folder / "harmonizer_lora.safetensors").unlink()
    return folder


def test_missing_lora_harmonizes_with_the_base_unet(no_lora, reposition, caplog):
    with caplog.at_level(logging.WARNING, logger="editrt.models.lora"):
        pipe = RepositionPipeline.from_pretrained(no_lora)
        RepositionPipeline.from_pretrained(no_lora)  # the same directory again: no second line
    lines = [r.getMessage() for r in caplog.records if r.name == "editrt.models.lora"]
    assert len(lines) == 1 and MESSAGE in lines[0], lines
    assert pipe.harmonizer.params == {}

    rng = np.random.default_rng()
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    mask = np.zeros((64, 96), bool)
    y, x = rng.integers(0, 32, 2)
    mask[y:y + 24, x:x + 40] = True
    ours = np.asarray(pipe.harmonize(image, mask, steps=1, seed=3, resolution=64))  # asks for c = 1 (the default)
    base = np.asarray(reposition.harmonize(image, mask, steps=1, seed=3, lora_scale=0.0, resolution=64))
    fused = np.asarray(reposition.harmonize(image, mask, steps=1, seed=3, lora_scale=1.0, resolution=64))
    np.testing.assert_array_equal(ours, base)
    assert np.abs(fused.astype(int) - ours).max() > 0, "with a LoRA, c = 1 must differ (else this test proves nothing)"


def test_a_damaged_lora_file_is_still_an_error(no_lora):
    (no_lora / "harmonizer_lora.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(WeightsError, match="harmonizer_lora.safetensors: not a readable safetensors file"):
        RepositionPipeline.from_pretrained(no_lora)


def test_reposition_flow_without_lora(no_lora, photo):
    """The whole SEELE flow (remove, paste, harmonize) runs on a directory with no LoRA."""
    pipe = RepositionPipeline.from_pretrained(no_lora)
    mask = np.zeros(photo.shape[:2], bool)
    mask[100:200, 150:260] = True
    result = pipe(photo, mask=mask, move=(30, -10), steps=1, resolution=64)
    assert "harmonized" in result.stages and result.image.size == (451, 300)


def test_warning_is_one_stderr_line_per_process(no_lora):
    """Without any logging set-up (the CLI): one line on stderr, however often the directory loads."""
    code = ("import sys; from editrt.models.lora import load_harmonizer_lora as load; "
            "assert load(sys.argv[1]) == {} and load(sys.argv[1]) == {}")
    run = subprocess.run([sys.executable, "-c", code, str(no_lora / "harmonizer_lora.safetensors")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines() == [f"editrt: warning: {no_lora / 'harmonizer_lora.safetensors'}: missing; "
                                       "harmonize runs the base UNet (LoRA scale c = 0)"]
