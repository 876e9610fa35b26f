"""What a server loads, as one typed value: `ServeConfig`, and `load_pipelines(config)`.

`editrt serve` builds a ServeConfig from its options (server/cli.py) and loads it in its own process;
`editrt serve --ray` resolves the weights once in the driver and hands the same ServeConfig (a frozen,
picklable dataclass) to every Ray Serve replica, which loads it with the same function
(server/ray_deployment.py). Neither front end imports the other.

    config = ServeConfig(weights="tiny", editors=("reposition",)).resolved()
    pipelines = load_pipelines(config)    # {"reposition": RepositionPipeline}
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from editrt.errors import InputError

EDITORS = ("reposition", "elements")


def parse_editors(text: str) -> tuple[str, ...]:
    """'reposition,elements' -> ('reposition', 'elements'); one-line InputError for anything else."""
    editors = tuple(e.strip() for e in text.split(",") if e.strip())
    if not editors or set(editors) - set(EDITORS):
        raise InputError(f"--editors {text!r}: expected reposition, elements or both (comma-separated)",
                         field="editors")
    return editors


@dataclass(frozen=True)
class ServeConfig:
    """Which pipelines a server loads, and how.

    weights: a weights directory, or 'tiny' / 'full' for the cached random weights; None: $EDITRT_WEIGHTS.
    device: cpu, cuda, cuda:N; None: cuda when available. dtype: fp32, fp16, bf16; None: fp16 on CUDA,
    fp32 on CPU. backend: torch, onnxruntime or tensorrt (`engines`: the folder `editrt export` wrote).
    queue_size: jobs waiting per pipeline before it refuses more (the server answers 503).
    quiet: no progress lines on stderr while resolving the weights.
    """

    weights: str | None = None
    editors: tuple[str, ...] = EDITORS
    device: str | None = None
    dtype: str | None = None
    backend: str = "torch"
    engines: str | None = None
    queue_size: int = 32
    quiet: bool = False

    def __post_init__(self):
        if isinstance(self.editors, str):  # a frozen dataclass: normalise through object.__setattr__
            object.__setattr__(self, "editors", parse_editors(self.editors))
        if not self.editors or set(self.editors) - set(EDITORS):
            raise InputError(f"editors {self.editors!r}: expected a non-empty subset of {EDITORS}", field="editors")
        if self.queue_size < 1:
            raise InputError(f"--queue-size: expected a positive number, got {self.queue_size}", field="queue_size")

    def resolved(self) -> ServeConfig:
        """The same config with `weights` an existing directory (cached random weights are made once) and the
        backend checked: done once, by whoever starts the server, before any process loads it."""
        from editrt.runtime.backends import check_backend
        from editrt.weights import resolve_weights

        check_backend(self.backend, self.engines)
        log = (lambda what: None) if self.quiet else (lambda what: print(f"editrt: {what}", file=sys.stderr))
        weights = resolve_weights(self.weights, log=log)  # None: $EDITRT_WEIGHTS
        return dataclasses.replace(self, weights=str(weights))


def load_pipelines(config: ServeConfig) -> dict:
    """{editor: pipeline} for the config's editors, loaded the way the other commands load them."""
    import torch

    config = config.resolved()  # a resolved config resolves to itself (a directory is only checked)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine", field="device")
    dtype = config.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    pipelines = {}
    for editor in config.editors:
        if editor == "reposition":
            from editrt.runtime.reposition import RepositionPipeline as cls
        else:
            from editrt.runtime.elements_pipeline import ElementsPipeline as cls
        pipelines[editor] = cls.from_pretrained(config.weights, device=device, dtype=dtype, backend=config.backend,
                                                engines=config.engines, max_waiting=config.queue_size)
    return pipelines
