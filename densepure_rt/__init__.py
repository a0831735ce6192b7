"""densepure-rt: certify image classifiers with DensePure at production speed.

The runtime package is lean: importing it (or any of its runtime modules) never imports torch.
The PyTorch side lives in ``densepure_rt.export`` (the repository's ``export/`` folder).
"""

__version__ = "0.1.0"
