"""GPU-only engine checks: ONNX Runtime IO binding against the CPU run, with inputs torch has just written.

Only a GPU shows these: whether ORT's CUDA stream reads the inputs after torch's stream wrote them
(runtime/engines.OrtEngine synchronises torch's current stream before the run and ORT's outputs
after it), and whether TF32 for SAM stays scoped to the encoder call.
"""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def exported(tiny_weights, tmp_path_factory):
    from editrt.export.components import export_components

    out = tmp_path_factory.mktemp("engines")
    export_components(tiny_weights, ["vae_decoder", "inpaint_unet"], out, check=False)
    return out


def test_ort_io_binding_equals_the_cpu_run_with_freshly_written_inputs(tiny_weights, exported):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without CUDAExecutionProvider (pip install onnxruntime-gpu)")
    from editrt.export.specs import network_specs
    from editrt.models.components import WeightsLayout
    from editrt.runtime.engines import OrtEngine

    specs = network_specs(WeightsLayout(tiny_weights).network_config())
    prompt = _prompt_shape(specs["inpaint_unet"])
    for name, make in (("vae_decoder", lambda g: dict(latent=torch.randn(1, 4, 8, 10, generator=g))),
                       ("inpaint_unet", lambda g: dict(sample=torch.randn(2, 9, 8, 8, generator=g),
                                                       timestep=torch.tensor([901.0, 17.0]),
                                                       encoder_hidden_states=torch.randn(2, *prompt, generator=g)))):
        gpu = OrtEngine(specs[name], exported / f"{name}.onnx", "cuda")
        cpu = OrtEngine(specs[name], exported / f"{name}.onnx", "cpu")
        for seed in range(3):
            inputs = make(torch.Generator().manual_seed(seed))
            # write each input on the GPU with a long kernel queue in front of it, so an unordered
            # read by ORT's stream would see the buffer before the write lands
            big = torch.randn(4096, 4096, device="cuda")
            for _ in range(20):
                big = big @ big / 64
            on_gpu = {k: (v.cuda() + 0 * big[0, 0]) for k, v in inputs.items()}
            got = gpu(**on_gpu)
            want = cpu(**inputs)
            for out in specs[name].output_names:
                a, b = got[out].cpu(), want[out]
                assert float((a - b).abs().max()) <= 1e-3 * float(b.abs().max()) + 1e-5, (name, out, seed)


def _prompt_shape(spec):
    tokens, width = spec.input("encoder_hidden_states").axes[1:]
    return (77 if isinstance(tokens, str) else tokens), width


def test_sam_tf32_is_scoped_to_the_encoder(tiny_weights):
    from editrt.runtime.reposition import RepositionPipeline

    before = torch.backends.cuda.matmul.allow_tf32
    pipe = RepositionPipeline.from_pretrained(tiny_weights, device="cuda")
    from runtime_doubles import CountingEngine

    seen = []
    pipe.engines["sam_image_encoder"] = CountingEngine(pipe.engines["sam_image_encoder"], [], "sam",
                                                       before=lambda: seen.append(torch.backends.cuda.matmul.allow_tf32))
    pipe.segment(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8), points=[[40, 30]])
    assert seen == [True]
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_capture_tolerates_another_threads_cuda_work(tiny_weights):
    """Loops capture with capture_error_mode="thread_local": an application thread allocating and
    copying on its own stream during a capture neither breaks it nor changes the results."""
    import threading

    from editrt.runtime.reposition import RepositionPipeline

    pipe = RepositionPipeline.from_pretrained(tiny_weights, device="cuda", cuda_graphs=True)
    eager = RepositionPipeline.from_pretrained(tiny_weights, device="cuda", cuda_graphs=False)
    image = np.random.default_rng(4).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    mask = np.zeros((96, 96), bool)
    mask[20:70, 30:80] = True
    stop = threading.Event()

    def app():
        stream, n = torch.cuda.Stream(), 1
        with torch.cuda.stream(stream):
            while not stop.is_set():
                n = n % 997 + 1
                torch.randn(n, 257, device="cuda").sum().item()  # fresh sizes: allocations, a host copy

    t = threading.Thread(target=app)
    t.start()
    try:
        got = [np.asarray(pipe.inpaint(image, mask, steps=3, seed=s, resolution=96)) for s in range(3)]
    finally:
        stop.set()
        t.join(30)
    assert any(loop.graph is not None for loop in pipe.loops.loops)
    for s, g in enumerate(got):
        np.testing.assert_array_equal(g, np.asarray(eager.inpaint(image, mask, steps=3, seed=s, resolution=96)))


def test_overlap_equals_running_one_after_another(tiny_weights):
    """overlap() runs SAM's encoder and the prompt embeddings on side streams; the results (recorded on
    the caller's stream) equal the same calls made in order, also after the side streams' memory is reused."""
    from editrt.runtime.reposition import RepositionPipeline
    from editrt.runtime.scheduler import overlap

    pipe = RepositionPipeline.from_pretrained(tiny_weights, device="cuda")
    rgb = np.random.default_rng(5).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    x, _ = pipe.segmenter.preprocess(rgb)
    encoder = pipe.engines["sam_image_encoder"]
    together = overlap("cuda", lambda: encoder(image=x)["image_embeddings"], lambda: (x * 2).sum())
    for _ in range(5):  # churn the allocator on other streams
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            torch.randn(1 << 20, device="cuda").mul_(3)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(together[0].cpu(), encoder(image=x)["image_embeddings"].cpu())
    assert float(together[1]) == float((x * 2).sum())
