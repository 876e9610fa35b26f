"""train/ sits below editrt/ (DESIGN.md: train may import models and runtime): no train module imports the top
layer (editrt.prompts, editrt.cli, ...), at module level or inside a function. The one exception is train/cli.py,
the `editrt train` argument parser that editrt/cli.py registers: it resolves --weights as every command does
(editrt.weights.resolve_weights)."""
import ast
from pathlib import Path

import editrt

TRAIN = Path(editrt.__file__).resolve().parent / "train"
BELOW = ("editrt.errors", "editrt.models", "editrt.kernels", "editrt.export", "editrt.runtime", "editrt.train")
CLI_ALSO = ("editrt.weights",)


def editrt_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("editrt")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("editrt"):
            found |= {node.module}
    return found


def test_train_imports_nothing_above_it():
    files = sorted(TRAIN.glob("*.py"))
    assert len(files) >= 8  # the walk sees the package
    upward = {}
    for path in files:
        allowed = BELOW + (CLI_ALSO if path.name == "cli.py" else ())
        bad = sorted(m for m in editrt_imports(path) if not m.startswith(allowed))
        if bad:
            upward[path.name] = bad
    assert not upward, f"train/ imports editrt's top layer: {upward}"


def test_text_prompt_encoder_is_one_class():
    """editrt.prompts (the CLI's `weights prompts`) and train/ use the models/ class itself, not a copy."""
    import editrt.prompts
    from editrt.models.text_prompts import TextPromptEncoder

    assert editrt.prompts.TextPromptEncoder is TextPromptEncoder
