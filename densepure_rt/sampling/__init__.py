"""Sampling: the batch loop over numpy or CuPy, the Philox noise and its key layout, the device (CPU or CUDA)."""
