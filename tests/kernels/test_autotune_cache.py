"""editrt.kernels.autotune_cache: keying, atomic writes, corrupt files, seeding a real Triton autotuner.

All on CPU: the autotuners are real `triton.autotune` objects (their in-memory table is what
Triton consults before benchmarking); the tuning itself needs a GPU and is stood in for by
writing a winner into that table, exactly where Autotuner.run puts it.
"""
import json
import os
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import editrt
from editrt.kernels import autotune_cache as ac

CONFIGS = [triton.Config({"BLOCK": 32}, num_warps=4), triton.Config({"BLOCK": 64}, num_warps=8, num_stages=3)]
IDENTITY = {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "torch": "2.14.1", "triton": "3.8.0", "cuda": "12.9"}


def _autotuner(configs=CONFIGS):
    @triton.autotune(configs=list(configs), key=["n"])
    @triton.jit
    def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    return _copy


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITRT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_file_is_keyed_by_gpu_versions_source_and_configs(cache_dir):
    base = ac.cache_file("k", IDENTITY, "src1", CONFIGS)
    assert base == ac.cache_file("k", dict(IDENTITY), "src1", list(CONFIGS))
    assert base.parent == cache_dir / "autotune" and base.name.startswith("k-")
    for change in ({"gpu": "NVIDIA H200"}, {"capability": "8.0"}, {"torch": "2.15.0"}, {"triton": "3.9.0"},
                   {"cuda": "13.0"}):
        assert ac.cache_file("k", {**IDENTITY, **change}, "src1", CONFIGS) != base, change
    assert ac.cache_file("k", IDENTITY, "src2", CONFIGS) != base
    assert ac.cache_file("k", IDENTITY, "src1", CONFIGS[:1]) != base
    assert ac.cache_file("other", IDENTITY, "src1", CONFIGS) != base


def test_default_root_is_the_user_cache_not_the_package(monkeypatch, tmp_path):
    monkeypatch.delenv("EDITRT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    root = ac.cache_root()
    assert root == tmp_path / ".cache" / "editrt"
    package = Path(editrt.__file__).resolve().parent.parent
    assert package not in ac.cache_file("k", IDENTITY, "s", CONFIGS).resolve().parents


def test_store_and_seed_round_trip(cache_dir):
    path = ac.cache_file("copy", IDENTITY, "s", CONFIGS)
    tuned = _autotuner()
    tuned.cache[(1000, "torch.float32", "torch.float32")] = tuned.configs[1]
    tuned.cache[(7, "torch.float16", "torch.float16")] = tuned.configs[0]
    ac.store(tuned, path)
    fresh = _autotuner()
    assert ac.seed(fresh, path) == 2
    assert fresh.cache[(1000, "torch.float32", "torch.float32")] is fresh.configs[1]
    assert fresh.cache[(7, "torch.float16", "torch.float16")] is fresh.configs[0]


def test_stored_configs_that_are_no_longer_candidates_are_not_used(cache_dir):
    path = ac.cache_file("copy", IDENTITY, "s", CONFIGS)
    tuned = _autotuner()
    tuned.cache[(1000,)] = tuned.configs[1]
    ac.store(tuned, path)
    other = _autotuner([CONFIGS[0], triton.Config({"BLOCK": 128}, num_warps=4)])
    assert ac.seed(other, path) == 0 and other.cache == {}


def test_store_merges_with_entries_of_other_processes(cache_dir):
    path = ac.cache_file("copy", IDENTITY, "s", CONFIGS)
    first, second = _autotuner(), _autotuner()
    first.cache[(1,)] = first.configs[0]
    ac.store(first, path)
    second.cache[(2,)] = second.configs[1]
    ac.store(second, path)
    keys = {tuple(e["key"]) for e in json.loads(path.read_text())["entries"]}
    assert keys == {(1,), (2,)}


def test_corrupt_or_foreign_file_is_ignored_with_a_warning(cache_dir):
    path = ac.cache_file("copy", IDENTITY, "s", CONFIGS)
    path.parent.mkdir(parents=True)
    for content in ("{not json", json.dumps({"format": 99, "entries": []}), json.dumps([1, 2]),
                    json.dumps({"format": ac.FORMAT, "entries": [{"key": 3, "config": {}}]})):
        path.write_text(content)
        fresh = _autotuner()
        with pytest.warns(RuntimeWarning, match="ignoring the autotune cache"):
            assert ac.seed(fresh, path) == 0
        assert fresh.cache == {}
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.warns(RuntimeWarning, match="ignoring"):
        assert ac.load(path) == []


def test_write_is_atomic(cache_dir, monkeypatch):
    path = ac.cache_file("copy", IDENTITY, "s", CONFIGS)
    tuned = _autotuner()
    tuned.cache[(1,)] = tuned.configs[0]
    ac.store(tuned, path)
    before = path.read_text()

    def crash(src, dst):
        raise OSError("disk full")

    tuned.cache[(2,)] = tuned.configs[1]
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        ac.store(tuned, path)
    monkeypatch.undo()
    assert path.read_text() == before  # the old file, whole
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_persisted_seeds_before_and_stores_after_a_cuda_launch(cache_dir, monkeypatch):
    """The wrapper around a launch: a new process (a fresh autotuner) starts with the stored winner."""
    monkeypatch.setattr(ac, "device_identity", lambda device: IDENTITY)
    cuda = torch.device("cuda", 0)
    tuned = _autotuner()
    with ac.persisted(tuned, "copy", cuda):
        tuned.cache[(4096, "torch.float16")] = tuned.configs[1]  # what Autotuner.run stores after benchmarking
    files = list((cache_dir / "autotune").glob("copy-*.json"))
    assert len(files) == 1
    fresh = _autotuner()
    with ac.persisted(fresh, "copy", cuda):
        assert fresh.cache == {(4096, "torch.float16"): fresh.configs[1]}  # seeded before the launch


def test_persisted_does_nothing_on_cpu(cache_dir):
    tuned = _autotuner()
    with ac.persisted(tuned, "copy", torch.device("cpu")):
        tuned.cache[(1,)] = tuned.configs[0]
    assert not cache_dir.exists()


@pytest.mark.gpu
def test_a_second_process_reuses_the_winners_without_benchmarking(tmp_path):
    """Real GPU: the first process tunes and writes the file; a second one launches with benchmarking
    forbidden (Autotuner._bench raises) and still runs, because its table was seeded from disk."""
    import subprocess
    import sys

    script = """
import sys, torch
from editrt.kernels import dual_attention as da
if sys.argv[1] == "second":
    def no_bench(*a, **k):
        raise AssertionError("benchmarked again")
    da._dual_attention_fwd_kernel._bench = no_bench
x = [torch.randn(2, 8, 1024, 80, device="cuda", dtype=torch.float16) for _ in range(2)]
kv = [torch.randn(2, 8, n, 80, device="cuda", dtype=torch.float16) for n in (77, 77, 256, 256)]
da.dual_cross_attention(x[0], kv[0], kv[1], x[1], kv[2], kv[3])
torch.cuda.synchronize()
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["EDITRT_CACHE"] = str(tmp_path)
    for run in ("first", "second"):
        done = subprocess.run([sys.executable, "-c", script, run], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    assert list((tmp_path / "autotune").glob("dual_attention-*.json"))


# ---------------------------------------------------------------------- bucketed tuning keys (issue 21, item 8)
def test_size_bucket_is_the_next_power_of_two_from_16():
    assert [ac.size_bucket(n) for n in (0, 1, 16, 17, 32, 33, 77, 256, 257, 4096, 4097)] == \
        [16, 16, 16, 32, 32, 64, 128, 256, 512, 4096, 8192]


def _benchmark_counter(monkeypatch, autotuner, configs):
    """The autotuner with `configs` and an empty table; its benchmark (GPU timing) stood in for by a
    recorder that makes the last config win, so the later launches run a config other than the first."""
    monkeypatch.setattr(autotuner, "configs", configs)
    monkeypatch.setattr(autotuner, "cache", {})
    benched = []

    def bench(*args, config, **kwargs):
        benched.append(config)
        return [1.0 if config is configs[-1] else 2.0]

    monkeypatch.setattr(autotuner, "_bench", bench)
    return benched


def test_dual_attention_tunes_once_per_size_bucket(monkeypatch):
    """A new element count or image size re-benchmarked every config (the key held exact sizes); sizes in
    one bucket now reuse the winner, and its results still equal the reference."""
    from editrt.kernels import dual_attention as da

    configs = [da._config(32, 32, 4, 1), da._config(16, 16, 4, 1)]
    benched = _benchmark_counter(monkeypatch, da._dual_attention_fwd_kernel, configs)
    for M, n_b in ((40, 20), (50, 30), (64, 17)):  # one bucket: M in (32, 64], N_b in (16, 32]
        inputs = [torch.randn(1, 2, rows, 40) for rows in (M, 13, 13, M, n_b, n_b)]
        torch.testing.assert_close(da.dual_cross_attention(*inputs), da.dual_cross_attention_reference(*inputs),
                                   atol=1e-5, rtol=1e-5)
    assert benched == configs  # benchmarked once, for the first size
    inputs = [torch.randn(1, 2, rows, 40) for rows in (65, 13, 13, 65, 20, 20)]  # M in the next bucket
    torch.testing.assert_close(da.dual_cross_attention(*inputs), da.dual_cross_attention_reference(*inputs),
                               atol=1e-5, rtol=1e-5)
    assert benched == configs * 2


def test_slic_assignment_tunes_once_per_size_bucket(monkeypatch):
    from editrt.kernels import slic

    configs = [triton.Config({"TILE_H": 32, "TILE_W": 32, "BLOCK_N": 32}, num_warps=4),
               triton.Config({"TILE_H": 16, "TILE_W": 16, "BLOCK_N": 16}, num_warps=4)]
    benched = _benchmark_counter(monkeypatch, slic._assign_kernel, configs)
    for N, H, W in ((20, 40, 56), (24, 33, 64), (30, 48, 50)):  # one bucket: N, H, W in (16, 32] / (32, 64]
        logits, centroids = torch.randn(N, 8, 8) * 4, torch.rand(N, 2)
        out = torch.full((H, W), -7, dtype=torch.int64)
        slic._launch_assign(logits, centroids, 64.0, H, W, out)
        assert torch.equal(out, slic.assign_reference(logits, centroids, 64.0, (H, W)))
    assert benched == configs
