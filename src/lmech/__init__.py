"""lmech: learning mechanics for PyTorch.

Instruments that attach to any training loop, solvable reference models with closed-form
predictions, and a catalog of experiments where theory is checked against measurement.
"""

__version__ = "0.1.0"
