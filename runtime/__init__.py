"""Engine backends, the CUDA-graph scheduler, pipelines and interactive sessions."""
