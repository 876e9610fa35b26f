"""editrt: a low-latency inference runtime for diffusion-based spatial image editing.

Public API (imported lazily, so `import editrt` and the CLI start fast):
    editrt.RepositionPipeline   subject repositioning (SEELE)
    editrt.ElementsPipeline     editable image elements (partition, edit, render)
    editrt.Elements             the editable elements of one image (coordinates in its pixels)
    editrt.EditSession          interactive editing: cached work, previews while dragging, final on release
    editrt.errors               the exception family for bad input
"""
__version__ = "0.1.0"

_LAZY = {
    "RepositionPipeline": ("editrt.runtime.reposition", "RepositionPipeline"),
    "RepositionResult": ("editrt.runtime.reposition", "RepositionResult"),
    "ElementsPipeline": ("editrt.runtime.elements_pipeline", "ElementsPipeline"),
    "Elements": ("editrt.runtime.elements", "Elements"),
    "EditSession": ("editrt.runtime.session", "EditSession"),
    "init_weights": ("editrt.weights", "init_weights"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'editrt' has no attribute {name!r}")


__all__ = list(_LAZY)
