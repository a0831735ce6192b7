"""PyTorch side of densepure-rt: models, checkpoints, the reference pipeline and ONNX export.

Installed as ``densepure_rt.export``; everything here may import torch.
"""
