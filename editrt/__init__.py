"""editrt: a low-latency inference runtime for diffusion-based spatial image editing.

Public API (imported lazily, so `import editrt` and the CLI start fast):
    editrt.RepositionPipeline   subject repositioning (SEELE)
    editrt.ElementsPipeline     editable image elements (partition, edit, render)
    editrt.Elements             the editable elements of one image (coordinates in its pixels)
    editrt.SeeleEdit            one subject repositioning (move, scale, occlusion, matting, shadows), validated once
    editrt.ElementsEdit         element edits (MoveElements, ResizeElements, DeleteElements, InsertElements) + prompt
    editrt.Quality              how a result is rendered: steps, guidance, seed, resolution
    editrt.open_session         interactive editing: a RepositionSession or an ElementsSession (preview, commit, undo)
    editrt.EditSession          the older name of open_session
    editrt.errors               the exception family for bad input
"""
__version__ = "0.1.0"

_LAZY = {
    "RepositionPipeline": ("editrt.runtime.reposition", "RepositionPipeline"),
    "RepositionResult": ("editrt.runtime.reposition", "RepositionResult"),
    "ElementsPipeline": ("editrt.runtime.elements_pipeline", "ElementsPipeline"),
    "Elements": ("editrt.runtime.elements", "Elements"),
    "EditSession": ("editrt.runtime.session", "EditSession"),
    "open_session": ("editrt.runtime.session", "open_session"),
    "RepositionSession": ("editrt.runtime.session", "RepositionSession"),
    "ElementsSession": ("editrt.runtime.session", "ElementsSession"),
    "SeeleEdit": ("editrt.runtime.edits", "SeeleEdit"),
    "ElementsEdit": ("editrt.runtime.edits", "ElementsEdit"),
    "MoveElements": ("editrt.runtime.edits", "MoveElements"),
    "ResizeElements": ("editrt.runtime.edits", "ResizeElements"),
    "DeleteElements": ("editrt.runtime.edits", "DeleteElements"),
    "InsertElements": ("editrt.runtime.edits", "InsertElements"),
    "Quality": ("editrt.runtime.edits", "Quality"),
    "init_weights": ("editrt.weights", "init_weights"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'editrt' has no attribute {name!r}")


__all__ = list(_LAZY)
