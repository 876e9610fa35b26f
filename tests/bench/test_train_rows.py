"""`editrt bench --only train`: one training step of every `editrt train` job on tiny weights, beside diffusers'
textual-inversion and LoRA steps; each row records the step it observed (1 step, B samples) and its networks."""
import json

import pytest
import torch
from bench_cli import FAST, run_cli

from editrt.bench.train_cases import BATCH, HARMONIZER, PROMPTS, STAGE1, STAGE2, samples_per_second


@pytest.fixture(scope="module")
def rows(tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("train-rows") / "b.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks on a shared 2-core machine: single-threaded is ~10x faster
    try:
        rc, err = run_cli(["--weights", tiny_weights, "--quick", "--only", "train", *FAST, "--json", out])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, err[-3000:]
    return {r["name"]: r for r in json.loads(out.read_text())["rows"]}


def test_every_job_has_a_training_step_row(rows):
    assert set(rows) == {f"{PROMPTS}/torch-eager", f"{PROMPTS}/diffusers", f"{HARMONIZER}/torch-eager",
                         f"{HARMONIZER}/diffusers", f"{STAGE1}/torch-eager", f"{STAGE2}/torch-eager"}
    for name, row in rows.items():
        assert row["skipped"] is None and row["p50_ms"] > 0 and row["peak_mb"] > 0, name
        assert row["observed"]["training_steps"] == 1 and row["observed"]["training_samples"] == BATCH, name
        assert samples_per_second(row) == pytest.approx(BATCH / (row["p50_ms"] / 1000)), name
        assert row["peer"] == name.endswith("/diffusers") and not row["compiled"] and not row["cuda_graph"], name


def test_the_rows_ran_the_networks_of_their_step(rows):
    def networks(name):
        return rows[name]["observed"]["networks"]

    assert networks(f"{PROMPTS}/torch-eager") == {"inpaint_unet": 1, "vae_encoder": 2}
    assert networks(f"{HARMONIZER}/torch-eager") == {"inpaint_unet": 1, "vae_encoder": 3}  # x, condition, x*
    # diffusers' scripts run the text encoder every step (the rows say why their work differs)
    for case in (PROMPTS, HARMONIZER):
        assert networks(f"{case}/diffusers") == {"inpaint_unet": 1, "vae_encoder": 2, "text_encoder": 1}
        assert rows[f"{case}/diffusers"]["work_differs"]
    assert networks(f"{STAGE1}/torch-eager") == {"content_encoder": 1, "light_decoder": 1}
    assert networks(f"{STAGE2}/torch-eager") == {"element_unet": 1, "vae_encoder": 1, "content_encoder": 1,
                                                 "text_encoder": 1}
