"""Executors: each binds buffers and runs one graph of an engine (ONNX Runtime, OpenVINO, TensorRT); nothing else."""
