"""ONNX graphs -> runnable engine directories (installed as ``densepure_rt.engine``)."""
