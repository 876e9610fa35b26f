"""tf32_matmuls under two threads (issue 23): interleaved scopes neither leave TF32 on nor turn it off under
a thread still inside. The flags are plain process-global switches, so this runs without a GPU."""
import threading

import pytest
import torch

from editrt.runtime.segmenter import tf32_matmuls

CUDA = torch.device("cuda")  # the scope only sets flags: no CUDA work runs here


def flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def tf32_off():
    saved = flags()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_interleaved_scopes_restore_the_flags_once_both_leave(tf32_off):
    """A enters, B enters, A leaves, B leaves (the order two editors' queues can produce)."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen, errors = {}, []

    def a():
        try:
            with tf32_matmuls(CUDA):
                a_in.set()
                assert b_in.wait(10)
        except BaseException as e:  # surfaced by the main thread below
            errors.append(e)
        finally:
            a_out.set()

    def b():
        try:
            assert a_in.wait(10)
            with tf32_matmuls(CUDA):
                b_in.set()
                assert a_out.wait(10)
                seen["b after a left"] = flags()
        except BaseException as e:
            errors.append(e)
            b_in.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors and not any(t.is_alive() for t in threads)
    assert seen["b after a left"] == (True, True)  # B's encoder still runs with TF32
    assert flags() == (False, False)  # both left: as before either entered


def test_cpu_scope_changes_nothing(tf32_off):
    with tf32_matmuls(torch.device("cpu")):
        assert flags() == (False, False)


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9: no fp32_precision")
@pytest.mark.parametrize("chosen", ["ieee", "tf32", "none"])
def test_a_process_on_the_new_precision_api_keeps_its_choice(chosen):
    """torch >= 2.9: the process chose its fp32 precision with `fp32_precision` (after which reading the legacy
    allow_tf32 raises); the scope still turns TF32 on inside (the legacy getters readable there) and puts
    that choice back exactly."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision = conv.fp32_precision = chosen
        with tf32_matmuls(CUDA):
            assert flags() == (True, True)
            assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        assert (matmul.fp32_precision, conv.fp32_precision) == (chosen, chosen)
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved
