"""Issue 15's split of gradnoise, sharpness and poprisk into one concept per file: every name the
old modules defined is still importable from them and is the object of its new home; the model
coercion (``as_functional``) behaves as the code it replaced."""

import dataclasses
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmech.core import FunctionalModel

# name -> new home, for every top-level name the module defined before the split
MOVED = {
    "lmech.probes.gradnoise": {
        "lmech.probes.gradnoise_stats": ["GATE_MARGIN", "GroupNoise", "GradNoise", "_noise_scale", "_jackknife_se",
                                         "_group_summaries"],
        "lmech.probes.gradnoise_linear": ["GUARD_RTOL", "_MEAN_OF_EXAMPLES", "_LOSS_MODULES", "_batch_scale",
                                          "_output_grads", "_linear_layers", "_LinearPass"],
        "lmech.probes.gradnoise_vmap": ["_moments", "_VmapPass"],
        "lmech.probes.gradnoise": ["_check_batchnorm", "grad_noise", "GradNoiseProbe"],
    },
    "lmech.probes.sharpness": {
        "lmech.probes.hessian": ["adam_preconditioner", "_resolve_preconditioner", "HessianOperator"],
        "lmech.probes.hessian_spectrum": ["hessian_trace", "hessian_spectral_density", "HessianTraceProbe",
                                          "SpectralDensityProbe"],
        "lmech.probes.sharpness": ["SharpnessResult", "sharpness", "_gradient_start", "sharpness_per_layer",
                                   "SharpnessProbe"],
    },
    "lmech.optim.poprisk": {
        "lmech.optim.poprisk_gate": ["GATES", "REDUCTIONS", "AlphaSpec", "resolve_alpha", "HARD_TIE_EPS",
                                     "_hard_tie_factor", "_Scalars", "_foreach_gate", "_state_gates"],
        "lmech.optim.poprisk_kernels": ["CPU_BLOCK_ELEMENTS", "_cache_blocks", "_fused_update", "_compiled_update"],
        "lmech.optim.poprisk_exact": ["leave_one_out_term", "batch_noise", "compare_noise_proxy"],
        "lmech.optim.poprisk": ["_check_group", "PopRiskAdamW"],
    },
    "lmech.probes.base": {
        "lmech.core.batch": ["split_batch", "subsample"],
        "lmech.probes.base": ["Cost", "TrainState", "Probe", "layer_groups"],
    },
}

OLD_ALL = {
    "lmech.probes.gradnoise": ["GroupNoise", "GradNoise", "grad_noise", "GradNoiseProbe"],
    "lmech.probes.sharpness": ["HessianOperator", "adam_preconditioner", "SharpnessResult", "sharpness",
                               "sharpness_per_layer", "hessian_trace", "hessian_spectral_density", "SharpnessProbe",
                               "HessianTraceProbe", "SpectralDensityProbe"],
    "lmech.optim.poprisk": ["PopRiskAdamW", "GATES", "REDUCTIONS", "CPU_BLOCK_ELEMENTS", "resolve_alpha",
                            "leave_one_out_term", "batch_noise", "compare_noise_proxy"],
}


@pytest.mark.parametrize("old", list(MOVED))
def test_old_paths_reexport_the_new_homes(old):
    module = importlib.import_module(old)
    for home, names in MOVED[old].items():
        new = importlib.import_module(home)
        for name in names:
            assert getattr(module, name) is getattr(new, name), (old, home, name)


@pytest.mark.parametrize("old", list(OLD_ALL))
def test_public_lists_unchanged(old):
    assert importlib.import_module(old).__all__ == OLD_ALL[old]


def test_package_exports_are_the_moved_objects():
    import lmech.optim
    import lmech.probes
    from lmech.optim.poprisk import PopRiskAdamW
    from lmech.probes.gradnoise_stats import GradNoise, GroupNoise
    from lmech.probes.hessian import HessianOperator, adam_preconditioner
    from lmech.probes.hessian_spectrum import hessian_trace

    assert lmech.probes.GradNoise is GradNoise and lmech.probes.GroupNoise is GroupNoise
    assert lmech.probes.HessianOperator is HessianOperator and lmech.probes.adam_preconditioner is adam_preconditioner
    assert lmech.probes.hessian_trace is hessian_trace
    assert callable(lmech.probes.sharpness) and callable(lmech.probes.ntk)  # functions, not modules
    assert lmech.optim.PopRiskAdamW is PopRiskAdamW and PopRiskAdamW.__module__ == "lmech.optim.poprisk"


def _same_summary(a, b) -> bool:
    """GroupNoise fields equal, nan equal to nan (a leave-one-out value may be inf)."""
    return all(x == y or (math.isnan(x) and math.isnan(y))
               for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b)))


def _model_and_batch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    return net, (x, y)


def test_functional_model_with_params_refused():
    from lmech.probes.gradnoise import grad_noise
    from lmech.probes.sharpness import HessianOperator

    net, batch = _model_and_batch()
    fm = FunctionalModel(net, ["2.weight"])
    for call in (lambda: grad_noise(fm, F.cross_entropy, batch, params=["0.bias"]),
                 lambda: HessianOperator(fm, F.cross_entropy, batch, params=["0.bias"])):
        with pytest.raises(ValueError, match="pass `params` only with an nn.Module; a FunctionalModel has its own"):
            call()


def test_functional_model_equals_module_with_params():
    from lmech.probes.gradnoise import grad_noise
    from lmech.probes.sharpness import sharpness

    net, batch = _model_and_batch()
    names = ["2.weight", "2.bias"]
    a = grad_noise(net, F.cross_entropy, batch, params=names)
    b = grad_noise(FunctionalModel(net, names), F.cross_entropy, batch)
    assert torch.equal(a.flat_sum, b.flat_sum) and torch.equal(a.flat_m2, b.flat_m2) and _same_summary(a.total, b.total)
    sa = sharpness(net, F.cross_entropy, batch, k=2, params=names, tol=1e-10)
    sb = sharpness(FunctionalModel(net, names), F.cross_entropy, batch, k=2, tol=1e-10)
    assert torch.equal(sa.eigenvalues, sb.eigenvalues)


def test_data_parallel_wrapper_is_measured_through_its_module():
    from lmech.probes.gradnoise import grad_noise
    from lmech.probes.sharpness import sharpness

    net, batch = _model_and_batch()
    wrapped = nn.DataParallel(net, device_ids=[]) if not torch.cuda.is_available() else nn.DataParallel(net)
    a, b = grad_noise(net, F.cross_entropy, batch), grad_noise(wrapped, F.cross_entropy, batch)
    assert list(a.mean) == list(b.mean) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert torch.equal(a.flat_sum, b.flat_sum) and _same_summary(a.total, b.total)
    sa = sharpness(net, F.cross_entropy, batch, tol=1e-10)
    sb = sharpness(wrapped, F.cross_entropy, batch, tol=1e-10)
    assert sa.names == sb.names and torch.equal(sa.eigenvalues, sb.eigenvalues)
