"""torch -> ONNX -> TensorRT: network specs (specs), export-only trace variants (traceable), ONNX export and
its parity check (onnx), every component of a weights directory (components), TensorRT build, cache, refit
and engines (tensorrt)."""
