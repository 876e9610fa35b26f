"""editrt.kernels.slic: exact label equality with assign_reference, and element statistics.

Inputs are fresh random tensors every run (no fixed seed); shapes are in the test ids. On CPU the
kernels run through Triton's interpreter at small sizes (N = 16..64 maps of 8..32 px upsampled to
17..101 px, non-square, not multiples of the 32-px tiles, both of PyTorch's CPU bilinear code
paths: out_h + out_w <= 128 and > 128); real sizes run under `gpu`.

The assignment is compared for EQUALITY (no tolerance). The bilinear sample is compared bit for
bit with F.interpolate, and the sigmoid with torch.sigmoid. Note: PyTorch's CPU loop computes the
last (numel % 32) elements of each parallel chunk with glibc expf instead of its vectorised SLEEF
expf (1 ulp apart on ~4% of inputs), so torch.sigmoid on CPU depends on an element's position;
tests that build exact or 1-ulp ties use N*H*W a multiple of 32 and below PyTorch's 32768-element
grain (one chunk), where every element takes the vectorised path that the kernel reproduces.
"""

import pytest
import torch
import torch.nn.functional as F

from editrt.kernels import launches, slic
from editrt.kernels.slic import assign, assign_reference, element_stats, element_stats_reference

# The interpreter evaluates the emulated expf with NumPy, which warns where exp(-x) overflows to
# inf for very negative logits -- the intended IEEE result (sigmoid -> 0).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def _random_problem(N, h, w, device="cpu", logit_scale=4.0, dtype=torch.float32):
    logits = (torch.randn(N, h, w, device=device) * logit_scale).to(dtype)  # SAM-like magnitudes
    centroids = torch.rand(N, 2, device=device)
    return logits, centroids


def _assign_poisoned(logits, centroids, beta, out_hw, **launch):
    """Kernel labels written into a buffer pre-filled with -7, so unwritten pixels fail."""
    out = torch.full(tuple(out_hw), -7, dtype=torch.int64, device=logits.device)
    if launch:
        slic._launch_assign(logits, centroids, beta, *out_hw, out, **launch)
    else:
        assert assign(logits, centroids, beta, out_hw, out=out).data_ptr() == out.data_ptr()
    assert (out != -7).all(), "kernel left pixels unwritten"
    return out


def _assert_labels_equal(labels, expected):
    mismatched = (labels != expected).sum().item()
    assert mismatched == 0, f"{mismatched} of {expected.numel()} labels differ from assign_reference"


# (N, h, w, H, W, beta)
CPU_CASES = [
    (16, 8, 8, 32, 32, 64.0),  # H + W <= 128: PyTorch CPU's channels-last bilinear path
    (24, 16, 12, 40, 56, 0.0),
    (20, 13, 17, 70, 90, 5.0),  # H + W > 128: generic path; odd sizes
    (64, 32, 32, 96, 96, 64.0),
    (40, 32, 24, 75, 101, 64.0),
    (16, 16, 16, 17, 23, 1e6),
    (32, 24, 20, 12, 9, 10.0),  # downsampling
]


def _case_id(case):
    N, h, w, H, W, beta = case
    return f"N{N}-{h}x{w}-to-{H}x{W}-beta{beta:g}"


@pytest.mark.parametrize("case", CPU_CASES, ids=_case_id)
def test_assign_equals_reference(case):
    N, h, w, H, W, beta = case
    logits, centroids = _random_problem(N, h, w)
    expected = assign_reference(logits, centroids, beta, (H, W))
    _assert_labels_equal(_assign_poisoned(logits, centroids, beta, (H, W)), expected)


@pytest.mark.parametrize("beta", [64.0, 1e6])
def test_pruning_is_exact(beta):
    """The pruned sweep (Morton order + skipped maps) gives the labels of the full sweep."""
    logits, centroids = _random_problem(48, 16, 16)
    pruned = _assign_poisoned(logits, centroids, beta, (80, 72), prune=True)
    full = _assign_poisoned(logits, centroids, beta, (80, 72), prune=False)
    _assert_labels_equal(pruned, full)
    _assert_labels_equal(pruned, assign_reference(logits, centroids, beta, (80, 72)))


def test_half_precision_and_strided_logits():
    logits, centroids = _random_problem(16, 12, 20, dtype=torch.float16)
    logits_t = logits.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides (h*w, 1, h)
    expected = assign_reference(logits, centroids, 20.0, (50, 90))
    _assert_labels_equal(_assign_poisoned(logits_t, centroids.double(), 20.0, (50, 90)), expected)


def test_functional_path():
    logits, centroids = _random_problem(8, 8, 8)
    _assert_labels_equal(assign(logits, centroids, 3.0, (40, 100)), assign_reference(logits, centroids, 3.0, (40, 100)))


# --------------------------------------------------------------------------------------------
# Bit-exactness of the per-pixel arithmetic
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "N,h,w,H,W",
    [
        (3, 8, 8, 32, 32),  # H + W <= 128: CPU channels-last path
        (2, 16, 12, 40, 56),
        (2, 13, 17, 70, 90),  # generic path
        (1, 32, 32, 96, 96),
        (2, 20, 20, 10, 13),  # downsampling
        (1, 1, 1, 5, 7),
    ],
    ids=lambda v: str(v),
)
def test_bilinear_and_sigmoid_bit_exact(N, h, w, H, W):
    """The kernel's upsampled value equals F.interpolate's bit for bit; its sigmoid equals
    torch.sigmoid of that value (on tensors with N*H*W % 32 == 0, see the module docstring)."""
    logits = torch.randn(N, h, w) * 30  # wide range: saturated and strongly negative sigmoids too
    value, sigmoid = slic._upsample_sigmoid_probe(logits, (H, W))
    expected = F.interpolate(logits[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(value.view(torch.int32), expected.view(torch.int32))

    flat = value.reshape(-1)
    usable = flat.numel() - flat.numel() % 32
    flat = flat[:usable]  # a fresh length-(multiple of 32) tensor: all vectorised in torch
    assert torch.equal(sigmoid.reshape(-1)[:usable].view(torch.int32), torch.sigmoid(flat).view(torch.int32))


def test_sigmoid_bit_exact_full_range():
    x = torch.cat([torch.randn(8192) * 8, torch.linspace(-120, 120, 8192), torch.randn(8192) * 1e-3])
    logits = x.view(1, 1, -1)  # upsampling 1 x n -> 1 x n is the identity: value == x
    value, sigmoid = slic._upsample_sigmoid_probe(logits, (1, x.numel()))
    assert torch.equal(value.view(-1), x)
    assert torch.equal(sigmoid.view(-1).view(torch.int32), torch.sigmoid(x).view(torch.int32))


# --------------------------------------------------------------------------------------------
# Properties and adversarial ties
# --------------------------------------------------------------------------------------------


def test_beta_zero_is_argmax_of_upsampled_sigmoid():
    logits, centroids = _random_problem(16, 16, 16)
    s = torch.sigmoid(F.interpolate(logits[:, None], size=(48, 64), mode="bilinear", align_corners=False)[:, 0])
    expected = torch.argmax(s, dim=0)  # CPU argmax returns the first maximum
    _assert_labels_equal(_assign_poisoned(logits, centroids, 0.0, (48, 64)), expected)


def test_huge_beta_gives_voronoi_cells():
    logits, centroids = _random_problem(24, 8, 8)
    H, W = 40, 52
    labels = _assign_poisoned(logits, centroids, 1e6, (H, W))
    _assert_labels_equal(labels, assign_reference(logits, centroids, 1e6, (H, W)))

    x = (torch.arange(W, dtype=torch.float64) + 0.5) / W
    y = (torch.arange(H, dtype=torch.float64) + 0.5) / H
    c = centroids.double()
    d = (x[None, None, :] - c[:, 0, None, None]) ** 2 + (y[None, :, None] - c[:, 1, None, None]) ** 2  # (N, H, W)
    nearest = d.argmin(dim=0)
    two_nearest = d.topk(2, dim=0, largest=False).values
    clear = (two_nearest[1] - two_nearest[0]) > 2e-6  # where sigmoid (<= 1e-6 at beta=1e6) can't matter
    assert clear.float().mean() > 0.95
    assert torch.equal(labels[clear], nearest[clear])


def test_duplicated_element_ties_go_to_lowest_index():
    N, h, w, H, W = 16, 12, 12, 32, 48  # N*H*W = 24576: one vectorised chunk in torch.sigmoid
    logits, centroids = _random_problem(N, h, w)
    for lo, hi in [(2, 9), (5, 6), (0, 15)]:
        logits[hi] = logits[lo]
        centroids[hi] = centroids[lo]
    for beta in (0.0, 30.0):
        labels = _assign_poisoned(logits, centroids, beta, (H, W))
        _assert_labels_equal(labels, assign_reference(logits, centroids, beta, (H, W)))
        assert not torch.isin(labels, torch.tensor([9, 6, 15])).any()
        assert torch.isin(labels, torch.tensor([2, 5, 0])).any()


def _ulp_perturbed(base: torch.Tensor, count: int) -> torch.Tensor:
    """`count` copies of `base`, each element moved by -1, 0 or +1 ulp at random."""
    copies = base.expand(count, *base.shape).clone()
    steps = torch.randint(-1, 2, copies.shape)
    up = torch.nextafter(copies, torch.tensor(float("inf")))
    down = torch.nextafter(copies, torch.tensor(float("-inf")))
    return torch.where(steps > 0, up, torch.where(steps < 0, down, copies))


@pytest.mark.parametrize("beta", [0.0, 50.0])
def test_adversarial_near_ties(beta):
    """Maps that differ by single ulps (and centroids that differ by single ulps): the argmax is
    decided by the last bit of the bilinear sample, the sigmoid and the penalty, or by the
    lowest index on exact ties. Any deviation from PyTorch's rounding shows up here."""
    N, h, w, H, W = 12, 16, 16, 48, 40  # N*H*W = 23040: one vectorised chunk in torch.sigmoid
    logits = _ulp_perturbed(torch.randn(h, w) * 3, N)
    centroids = _ulp_perturbed(torch.rand(2), N)
    labels = _assign_poisoned(logits, centroids, beta, (H, W))
    expected = assign_reference(logits, centroids, beta, (H, W))
    _assert_labels_equal(labels, expected)
    assert expected.unique().numel() > 1  # the ties are really decided by rounding, not by one map


def test_saturated_sigmoid_ties():
    """Logits of 20..40 give sigmoid == 1.0 exactly: the distance and the lowest index decide."""
    N, h, w, H, W = 16, 8, 8, 32, 32  # N*H*W = 16384
    logits = 20 + 20 * torch.rand(N, h, w)
    centroids = torch.rand(N, 2)
    centroids[8:] = centroids[:8]  # duplicated positions: exact ties between i and i + 8
    labels = _assign_poisoned(logits, centroids, 10.0, (H, W))
    _assert_labels_equal(labels, assign_reference(logits, centroids, 10.0, (H, W)))
    assert (labels < 8).all()


# --------------------------------------------------------------------------------------------
# element_stats
# --------------------------------------------------------------------------------------------


def _random_labels(H, W, N, empty=(), drop_fraction=0.2):
    labels = torch.randint(0, N, (H, W))
    for e in empty:
        labels[labels == e] = (e + 1) % N
    labels[torch.rand(H, W) < drop_fraction] = -1
    return labels


def _assert_stats_equal(got, expected):
    counts, centroids, boxes = got
    e_counts, e_centroids, e_boxes = expected
    assert torch.equal(counts, e_counts)
    assert torch.equal(boxes, e_boxes)
    assert torch.equal(centroids.isnan(), e_centroids.isnan())
    assert torch.equal(centroids.nan_to_num(-1), e_centroids.nan_to_num(-1))


@pytest.mark.parametrize("H,W,N", [(37, 53, 20), (64, 64, 70), (5, 300, 3)], ids=lambda v: str(v))
def test_element_stats_equals_reference(H, W, N):
    labels = _random_labels(H, W, N, empty=(1, N - 1))
    labels[0, :3] = N + 5  # out of range: ignored like -1
    stats = element_stats(labels, N)
    _assert_stats_equal(stats, element_stats_reference(labels, N))
    _assert_stats_equal(element_stats(labels, N), stats)  # deterministic

    counts, centroids, boxes = stats
    assert counts[1] == 0 and counts[N - 1] == 0
    assert centroids[1].isnan().all() and (boxes[1] == -1).all()

    # Independent check of one element's statistics.
    e = 0
    rows, cols = torch.nonzero(labels == e, as_tuple=True)
    assert counts[e] == rows.numel()
    expected_centroid = torch.stack([((cols + 0.5) / W).double().mean(), ((rows + 0.5) / H).double().mean()])
    torch.testing.assert_close(centroids[e].double(), expected_centroid, atol=1e-6, rtol=0)
    assert boxes[e].tolist() == [cols.min().item(), rows.min().item(), cols.max().item(), rows.max().item()]


def test_element_stats_of_assign_labels_and_strided():
    logits, centroids = _random_problem(16, 8, 8)
    labels = assign(logits, centroids, 64.0, (40, 48))
    _assert_stats_equal(element_stats(labels.T, 16), element_stats_reference(labels.T.contiguous(), 16))


# --------------------------------------------------------------------------------------------
# Errors, off switch, op registration
# --------------------------------------------------------------------------------------------


def _bad_assign_cases():
    logits, centroids = _random_problem(4, 8, 8)
    return {
        "2-D logits": ((logits[0], centroids, 1.0, (16, 16)), "logits"),
        "int logits": ((logits.long(), centroids, 1.0, (16, 16)), "logits"),
        "centroid count": ((logits, centroids[:3], 1.0, (16, 16)), "centroids"),
        "centroid width": ((logits, torch.rand(4, 3), 1.0, (16, 16)), "centroids"),
        "negative beta": ((logits, centroids, -1.0, (16, 16)), "beta"),
        "nan beta": ((logits, centroids, float("nan"), (16, 16)), "beta"),
        "tensor beta": ((logits, centroids, torch.tensor(1.0), (16, 16)), "beta"),
        "zero height": ((logits, centroids, 1.0, (0, 16)), "out_hw"),
        "three sizes": ((logits, centroids, 1.0, (16, 16, 3)), "out_hw"),
        "float size": ((logits, centroids, 1.0, (16.5, 16)), "out_hw"),
    }


@pytest.mark.parametrize("name", list(_bad_assign_cases()))
def test_assign_bad_inputs_raise(name):
    args, culprit = _bad_assign_cases()[name]
    with pytest.raises(ValueError, match=culprit):
        assign(*args)
    with pytest.raises(ValueError, match=culprit):
        assign_reference(*args)


def test_bad_out_and_labels_raise():
    logits, centroids = _random_problem(4, 8, 8)
    with pytest.raises(ValueError, match="out"):
        assign(logits, centroids, 1.0, (16, 16), out=torch.empty(16, 15, dtype=torch.int64))
    with pytest.raises(ValueError, match="out"):
        assign(logits, centroids, 1.0, (16, 16), out=torch.empty(16, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="labels"):
        element_stats(torch.zeros(4, 4, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="labels"):
        element_stats(torch.zeros(16, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="num_elements"):
        element_stats(torch.zeros(4, 4, dtype=torch.int64), 0)


def test_disable_env_var_falls_back_to_reference(monkeypatch):
    logits, centroids = _random_problem(8, 8, 8)
    labels = torch.randint(-1, 8, (20, 24))

    def no_kernel(*args, **kwargs):
        raise AssertionError("Triton kernel launched although EDITRT_DISABLE_TRITON=1")

    monkeypatch.setenv("EDITRT_DISABLE_TRITON", "1")
    monkeypatch.setattr(slic, "_launch_assign", no_kernel)
    monkeypatch.setattr(slic, "_launch_element_stats", no_kernel)
    _assert_labels_equal(assign(logits, centroids, 5.0, (20, 24)), assign_reference(logits, centroids, 5.0, (20, 24)))
    _assert_stats_equal(element_stats(labels, 8), element_stats_reference(labels, 8))


def test_custom_op_registration():
    logits, centroids = _random_problem(4, 6, 6)
    torch.library.opcheck(torch.ops.editrt.slic_assign.default, (logits, centroids, 8.0, 12, 10))
    labels = torch.randint(-1, 4, (12, 10))
    torch.library.opcheck(torch.ops.editrt.slic_element_stats.default, (labels, 4))


# --------------------------------------------------------------------------------------------
# GPU: the real sizes (N = 256 elements, SAM's 256 x 256 low-res logits)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("out_side", [512, 1024])
@pytest.mark.parametrize("beta", [0.0, 64.0, 1e4])
def test_assign_equals_reference_gpu(out_side, beta):
    logits, centroids = _random_problem(256, 256, 256, device="cuda", logit_scale=8.0)
    expected = assign_reference(logits, centroids, beta, (out_side, out_side))
    _assert_labels_equal(_assign_poisoned(logits, centroids, beta, (out_side, out_side)), expected)


@pytest.mark.gpu
def test_bilinear_and_sigmoid_bit_exact_gpu():
    logits = torch.randn(16, 256, 256, device="cuda") * 30
    for out_hw in [(512, 512), (1024, 1024), (300, 700), (64, 64)]:
        value, sigmoid = slic._upsample_sigmoid_probe(logits, out_hw)
        expected = F.interpolate(logits[:, None], size=out_hw, mode="bilinear", align_corners=False)[:, 0]
        assert torch.equal(value.view(torch.int32), expected.view(torch.int32)), out_hw
        assert torch.equal(sigmoid.view(torch.int32), torch.sigmoid(value).view(torch.int32)), out_hw
    x = torch.cat([torch.linspace(-120, 120, 1 << 20), torch.randn(1 << 20) * 8]).cuda()
    _, sigmoid = slic._upsample_sigmoid_probe(x.view(1, 1, -1), (1, x.numel()))
    assert torch.equal(sigmoid.view(-1).view(torch.int32), torch.sigmoid(x).view(torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("beta", [0.0, 50.0])
def test_adversarial_near_ties_gpu(beta):
    logits = _ulp_perturbed(torch.randn(256, 256) * 3, 64).cuda()
    centroids = _ulp_perturbed(torch.rand(2), 64).cuda()
    expected = assign_reference(logits, centroids, beta, (512, 512))
    _assert_labels_equal(_assign_poisoned(logits, centroids, beta, (512, 512)), expected)


@pytest.mark.gpu
def test_element_stats_gpu():
    labels = _random_labels(512, 512, 256, empty=(7,)).cuda()
    _assert_stats_equal(element_stats(labels, 256), element_stats_reference(labels, 256))


def test_kernel_launches_are_recorded_and_reference_calls_are_not(monkeypatch):
    logits, centroids = _random_problem(16, 8, 8)
    labels = torch.randint(-1, 16, (20, 24))
    with launches.track() as seen:
        assign(logits, centroids, 64.0, (16, 16))
        element_stats(labels, 16)
    assert seen.counts == {"slic_assign": 1, "slic_element_stats": 1}
    with launches.track() as seen:
        assign_reference(logits, centroids, 64.0, (16, 16))
        element_stats_reference(labels, 16)
        monkeypatch.setenv("EDITRT_DISABLE_TRITON", "1")  # the public API falls back to the references
        assign(logits, centroids, 64.0, (16, 16))
        element_stats(labels, 16)
    assert seen.names == []
