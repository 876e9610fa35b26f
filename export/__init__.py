"""torch -> ONNX -> TensorRT exporters, engine cache and refit."""
