"""Closed-form and numerical predictions of learning mechanics, one setting per module.

======================  =====================================================================
``deep_linear``         Saxe-McClelland-Ganguli mode dynamics (depth 2 and L), learning times,
                        balancedness and its GD drift
``kernels``             eigenlearning: KRR learning curves from the kernel spectrum
``scaling``             Chinchilla law fit (Huber on log L, L-BFGS from a grid, bootstrap CIs)
``attention``           self-attention as interacting particles on the sphere
``stability``           edge-of-stability thresholds of GD, momentum and Adam
======================  =====================================================================

Modules are imported on use (``from lmech.theory import kernels``); nothing is loaded here.
"""
