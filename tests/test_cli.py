"""The CLI: each command works, and each bad input gives one line on stderr, exit 2, no output file."""
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from editrt.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_weights):
    from skimage import data

    d = tmp_path_factory.mktemp("cli")
    photo = data.chelsea()
    Image.fromarray(photo).save(d / "photo.png")
    mask = np.zeros(photo.shape[:2], np.uint8)
    mask[100:200, 150:260] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(mask[:-10]).save(d / "small_mask.png")
    Image.fromarray(np.zeros_like(mask)).save(d / "empty_mask.png")
    (d / "not_an_image.png").write_bytes(b"hello")
    broken = d / "broken_weights"
    shutil.copytree(tiny_weights, broken)
    (broken / "task_prompts.safetensors").write_bytes(b"xx")
    return d


def run(args, capsys):
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.err


def common(tiny_weights):
    return ["--weights", tiny_weights, "--steps", "2", "--resolution", "64", "--quiet"]


def test_segment_inpaint_reposition(files, tiny_weights, tmp_path, capsys):
    rc, err = run(["segment", files / "photo.png", "--point", "200,150", "--point", "20,20,0", "-o", tmp_path / "m.png",
                   "--weights", tiny_weights, "--quiet"], capsys)
    assert rc == 0, err
    assert Image.open(tmp_path / "m.png").size == (451, 300)
    rc, err = run(["inpaint", files / "photo.png", files / "mask.png", "--task", "complete", "-o", tmp_path / "i.png",
                   *common(tiny_weights)], capsys)
    assert rc == 0, err
    rc, err = run(["reposition", files / "photo.png", "--mask", files / "mask.png", "--move", "40,-10", "--scale", "1.2",
                   "--save-stages", tmp_path / "stages", "-o", tmp_path / "r.png", *common(tiny_weights)], capsys)
    assert rc == 0, err
    out = np.asarray(Image.open(tmp_path / "r.png"))
    assert out.shape == (300, 451, 3)
    assert (tmp_path / "stages" / "1_subject_mask.png").is_file() and (tmp_path / "stages" / "4_harmonized.png").is_file()


def test_weights_init_cli(tmp_path, capsys):
    rc, err = run(["weights", "init", tmp_path / "w", "--config", "tiny", "--seed", "3"], capsys)
    assert rc == 0, err
    assert (tmp_path / "w" / "inpaint" / "unet" / "config.json").is_file()
    rc, err = run(["weights", "init", tmp_path / "w"], capsys)
    assert rc == 2 and "not empty" in err


BAD = [
    (["inpaint", "{d}/not_an_image.png", "{d}/mask.png"], "cannot read it as an image"),
    (["inpaint", "{d}/missing.png", "{d}/mask.png"], "no such file"),
    (["inpaint", "{d}/photo.png", "{d}/small_mask.png"], "mask: size 451x290 differs from the image size 451x300"),
    (["inpaint", "{d}/photo.png", "{d}/empty_mask.png"], "mask: is empty"),
    (["inpaint", "{d}/photo.png", "{d}/mask.png", "--task", "sharpen"], "task: expected 'remove' or 'complete'"),
    (["reposition", "{d}/photo.png", "--point", "500,20", "--move", "1,1"], "outside the image"),
    (["reposition", "{d}/photo.png", "--box", "10,10,20", "--move", "1,1"], "--box '10,10,20': expected X0,Y0,X1,Y1"),
    (["reposition", "{d}/photo.png", "--box", "10,10,900,20", "--move", "1,1"], "inside the image"),
    (["reposition", "{d}/photo.png", "--mask", "{d}/mask.png", "--move", "2000,0"], "outside the image"),
    (["reposition", "{d}/photo.png", "--mask", "{d}/mask.png", "--move", "a,b"], "--move 'a,b': expected X,Y"),
    (["reposition", "{d}/photo.png", "--move", "1,1"], "expected the subject as --mask"),
    (["reposition", "{d}/photo.png", "--mask", "{d}/mask.png", "--move", "1,1", "--complete-mask", "{d}/small_mask.png"],
     "complete_mask: size"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_one_line_exit_2_no_output(files, tiny_weights, tmp_path, capsys, args, message):
    out = tmp_path / "out.png"
    args = [a.format(d=files) for a in args] + ["-o", out, *common(tiny_weights)]
    rc, err = run(args, capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("editrt: error:") and message in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("weights,message", [("/nonexistent/w", "no such weights directory"),
                                              ("{d}/broken_weights", "task_prompts.safetensors: not a readable")])
def test_missing_or_corrupt_weights(files, tmp_path, capsys, weights, message):
    rc, err = run(["inpaint", files / "photo.png", files / "mask.png", "-o", tmp_path / "o.png",
                   "--weights", weights.format(d=files), "--quiet"], capsys)
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o.png").exists()


def test_console_script_exit_code_and_no_traceback(files, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "editrt.cli", "inpaint", str(files / "photo.png"),
                           str(files / "empty_mask.png"), "-o", str(tmp_path / "o.png"), "--weights", "/nonexistent"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert shutil.which("editrt"), "the console script `editrt` is installed"


# ---------------------------------------------------------------------- argparse errors, --version, --dtype
ARGPARSE_BAD = [
    (["segment", "{d}/photo.png", "--point", "1,1", "-o", "{o}", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["segment", "{d}/photo.png", "--point", "1,1", "-o", "{o}", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["segment", "{d}/photo.png", "--point", "1,1"], "the following arguments are required: -o/--output"),
    (["inpaint", "{d}/photo.png", "{d}/mask.png", "-o", "{o}", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["teleport"], "invalid choice: 'teleport'"),
    ([], "the following arguments are required: COMMAND"),
]


@pytest.mark.parametrize("args,message", ARGPARSE_BAD)
def test_argparse_errors_are_one_line_exit_2(files, tmp_path, capsys, args, message):
    out = tmp_path / "out.png"
    rc, err = run([a.format(d=files, o=out) for a in args], capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("editrt: error:") and message in err, err
    assert "usage:" not in err
    assert list(tmp_path.iterdir()) == []


def test_argparse_error_from_the_console_script(files, tmp_path):
    proc = subprocess.run(["editrt", "inpaint", str(files / "photo.png"), str(files / "mask.png"), "-o",
                           str(tmp_path / "o.png"), "--dtype", "double"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "argument --dtype: invalid choice: 'double'" in proc.stderr, proc.stderr


def test_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"editrt {version('editrt')}\n"  # the installed package's metadata


@pytest.mark.parametrize("alias,canonical", [("float32", "fp32"), ("float16", "fp16"), ("bfloat16", "bf16")])
def test_dtype_aliases_run_the_same_precision(files, tiny_weights, tmp_path, capsys, alias, canonical):
    outputs = {}
    for dtype in (alias, canonical, "fp32" if canonical != "fp32" else "bf16"):
        out = tmp_path / f"{dtype}.png"
        rc, err = run(["inpaint", files / "photo.png", files / "mask.png", "-o", out, "--dtype", dtype,
                       "--weights", tiny_weights, "--steps", "1", "--resolution", "64", "--quiet"], capsys)
        assert rc == 0, err
        outputs[dtype] = np.asarray(Image.open(out))
    other = [k for k in outputs if k not in (alias, canonical)][0]
    np.testing.assert_array_equal(outputs[alias], outputs[canonical])
    assert not np.array_equal(outputs[alias], outputs[other])  # the dtype really reached the pipeline


@pytest.fixture(scope="module")
def fp16_overflowing_weights(tiny_weights, tmp_path_factory):
    """Real weights whose inpainting UNet overflows in fp16 whatever the attention does (conv_in x 1e6)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("overflow") / "w"
    shutil.copytree(tiny_weights, root)
    path = root / "inpaint" / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    state["conv_in.weight"] = state["conv_in.weight"] * 1e6
    save_file(state, str(path))
    return root


def test_fp16_probe_failure_is_one_line(files, fp16_overflowing_weights, tmp_path):
    proc = subprocess.run(["editrt", "inpaint", str(files / "photo.png"), str(files / "mask.png"), "-o",
                           str(tmp_path / "o.png"), "--dtype", "float16", "--weights", str(fp16_overflowing_weights),
                           "--steps", "1", "--resolution", "64", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "overflows in fp16" in proc.stderr, proc.stderr
    assert not (tmp_path / "o.png").exists()


# ---------------------------------------------------------------------- lazy commands: doctor, serve
def test_doctor_and_serve_are_imported_only_when_they_run(tmp_path):
    code = ("import sys; from editrt.cli import main; rc = main(['weights', 'init', sys.argv[1]]); "
            "print(rc, 'editrt.doctor' in sys.modules, 'editrt.runtime.server.cli' in sys.modules)")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "full")], capture_output=True, text=True)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stderr


def test_a_missing_lazy_command_module_is_one_line(monkeypatch, capsys):
    import editrt.cli as cli

    monkeypatch.setitem(cli._LAZY_COMMANDS, "doctor", ("editrt.no_such_module", "a module that is not there"))
    rc, err = run(["doctor", "--arch", "sm_90"], capsys)
    assert rc == 2 and err == "editrt: error: doctor: unavailable; it needs the module 'editrt.no_such_module', " \
                              "which is not installed\n"
    assert main(["--version"]) == 0  # every other command still works


def test_lazy_command_contract(monkeypatch, tmp_path, capsys):
    """configure_parser(p) adds the options, run(args) returns the exit code; a dependency that run() imports
    and is missing is one line too."""
    import editrt.cli as cli

    (tmp_path / "lazy_probe.py").write_text(
        "def configure_parser(p):\n    p.add_argument('--code', type=int, default=0)\n    p.add_argument('--need')\n"
        "def run(args):\n    if args.need:\n        __import__(args.need)\n    return args.code\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli._LAZY_COMMANDS, "serve", ("lazy_probe", "a probe"))
    assert main(["serve", "--code", "3"]) == 3
    rc, err = run(["serve", "--need", "no_such_dependency_xyz"], capsys)
    assert rc == 2 and err == "editrt: error: serve: unavailable; it needs the module 'no_such_dependency_xyz', " \
                              "which is not installed\n"


@pytest.mark.parametrize("command,module", [("doctor", "editrt.doctor"), ("serve", "editrt.runtime.server.cli")])
def test_lazy_commands_register_their_options(command, module, capsys):
    importlib.import_module(module)  # both are editrt's own modules: never a reason to skip
    with pytest.raises(SystemExit) as exit_info:  # --help prints and exits 0 (argparse's own behaviour)
        from editrt.cli import build_parser

        build_parser(command).parse_args([command, "--help"])
    assert exit_info.value.code == 0 and f"usage: editrt {command}" in capsys.readouterr().out
    assert main([command, "--no-such-option"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments: --no-such-option" in err


# ---------------------------------------------------------------------- export --check
def test_export_check_prints_each_error_and_fails_above_the_tolerance(tiny_weights, tmp_path, capsys, monkeypatch):
    names = ["content_encoder", "vae_decoder"]
    rc = main(["export", "--weights", str(tiny_weights), "--component", ",".join(names), "-o", str(tmp_path / "e"),
               "--check", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rows = [line.split("\t") for line in captured.out.strip().splitlines()]
    assert [r[0] for r in rows] == names  # one line per component, on stdout
    for name, error, path, precision in rows:
        assert path == str(tmp_path / "e" / f"{name}.onnx") and Path(path).is_file() and precision == "fp32"
        assert error.startswith("max relative error vs PyTorch") and 0 < float(error.rsplit(" ", 1)[1]) <= 1e-4
    import editrt.export.onnx as onnx_export

    monkeypatch.setitem(onnx_export.TOLERANCES, "fp32", 0.0)  # any real fp32 difference is now above it
    rc, err = run(["export", "--weights", tiny_weights, "--component", "content_encoder", "-o", tmp_path / "e3",
                   "--check", "--quiet"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "content_encoder: ONNX Runtime" in err and "more than 0" in err, err
    assert not list((tmp_path / "e3").glob("*.onnx"))
    rc, err = run(["export", "--weights", tiny_weights, "--component", "content_encoder", "-o", tmp_path / "e4",
                   "--precision", "fp8"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "--precision fp8: ONNX graphs are fp32 or fp16" in err, err


def test_unwritable_output_is_one_line(files, tiny_weights, tmp_path, capsys):
    """The system refusing the output (here: its folder is a file) is the user's to fix: one line, exit 2."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    rc, err = run(["segment", files / "photo.png", "--point", "200,150", "-o", blocker / "m.png",
                   "--weights", tiny_weights, "--quiet"], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"editrt: error: {blocker}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]
