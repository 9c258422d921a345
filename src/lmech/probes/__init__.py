"""Instruments: each measures a training state and returns named scalars or arrays.

One concept per module, each with plain functions and a probe class for :class:`lmech.Monitor`
(the protocol is in :mod:`~lmech.probes.base`):

* :mod:`~lmech.probes.sharpness` — top Hessian eigenvalues (plain and Adam-preconditioned), on
  the operator of :mod:`~lmech.probes.hessian` (with Adam's preconditioner); Hessian trace and
  spectral density in :mod:`~lmech.probes.hessian_spectrum`;
* :mod:`~lmech.probes.ntk` — empirical NTK (two algorithms and a cost model), spectrum, drift,
  kernel-target alignment;
* :mod:`~lmech.probes.gradnoise` — gradient SNR, leave-one-out noise, gradient noise scale (its
  summaries in :mod:`~lmech.probes.gradnoise_stats`, its two per-example passes in
  :mod:`~lmech.probes.gradnoise_linear` and :mod:`~lmech.probes.gradnoise_vmap`);
* :mod:`~lmech.probes.weights` — singular values, stable rank, power-law exponent, change from
  initialization;
* :mod:`~lmech.probes.representations` — CKA, SVCCA, mutual k-NN with permutation nulls;
* :mod:`~lmech.probes.gramian` — the path-integrated NTK operators (propagator, dissipation
  Gramian, train-test coupling): signal channel and reservoir along a real run.

Precision and devices (:mod:`~lmech.probes.precision`): every probe runs with ``torch.autocast``
switched off, in the parameters' dtype (float32 under autocast training), and reduces in float32 or
float64; probes run on the model's device (CPU or CUDA) and return Python floats or tensors.

The functions ``sharpness`` and ``ntk`` are re-exported here under their modules' names, so
``lmech.probes.ntk`` is the function; reach a module itself with
``from lmech.probes.ntk import ...`` or ``importlib.import_module("lmech.probes.ntk")``.
"""

from lmech.probes.batch_sharpness import BatchSharpnessProbe, BatchSharpnessResult, batch_sharpness
from lmech.probes.base import Probe, TrainState, differentiable_kernels, layer_groups
from lmech.probes.gradnoise import GradNoiseProbe, grad_noise
from lmech.probes.gradnoise_stats import GradNoise, GroupNoise
from lmech.probes.gramian import GramianProbe, GramianReadout, PathRecorder
from lmech.probes.ntk import (
    KernelDrift,
    NTKCost,
    NTKProbe,
    kernel_alignment,
    kernel_drift,
    kernel_spectrum,
    kernel_target_alignment,
    ntk,
    ntk_cost,
    per_example_jacobian,
)
from lmech.probes.representations import (
    RepresentationProbe,
    SimilarityResult,
    layer_features,
    linear_cka,
    mutual_knn,
    similarity,
    svcca,
)
from lmech.probes.hessian import HessianOperator, adam_preconditioner
from lmech.probes.hessian_spectrum import HessianTraceProbe, SpectralDensityProbe, hessian_spectral_density, hessian_trace
from lmech.probes.sharpness import SharpnessProbe, SharpnessResult, sharpness, sharpness_per_layer
from lmech.probes.weights import (
    LayerSpectrum,
    PowerLawFit,
    WeightSpectrumProbe,
    power_law_fit,
    spectral_norm,
    spectral_norm_and_vector,
    weight_spectra,
)
from lmech.probes.weightwatcher_fit import conv_slices, power_law_fit_weightwatcher

__all__ = [
    # base
    "Probe", "TrainState", "differentiable_kernels", "layer_groups",
    # sharpness
    "HessianOperator", "SharpnessResult", "adam_preconditioner", "sharpness", "sharpness_per_layer",
    "hessian_trace", "hessian_spectral_density", "SharpnessProbe", "HessianTraceProbe",
    "SpectralDensityProbe",
    # ntk
    "ntk", "ntk_cost", "NTKCost", "per_example_jacobian", "kernel_spectrum", "kernel_alignment",
    "KernelDrift", "kernel_drift", "kernel_target_alignment", "NTKProbe",
    # gradient noise
    "grad_noise", "GradNoise", "GroupNoise", "GradNoiseProbe",
    # weights
    "power_law_fit", "PowerLawFit", "weight_spectra", "spectral_norm", "spectral_norm_and_vector",
    "LayerSpectrum", "WeightSpectrumProbe", "power_law_fit_weightwatcher", "conv_slices",
    # representations
    "linear_cka", "svcca", "mutual_knn", "similarity", "SimilarityResult", "layer_features",
    "RepresentationProbe",
    # signal channel / reservoir
    "PathRecorder", "GramianReadout", "GramianProbe",
]
__all__ += ["batch_sharpness", "BatchSharpnessResult", "BatchSharpnessProbe"]  # edge of stochastic stability
