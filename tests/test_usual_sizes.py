"""scripts/usual_sizes.py: every probe on the zoo's models either works (a finite value) or refuses
in one line raised by lmech (never a traceback out of torch or transformers).

The usual sizes (GPT-2 124M, BERT-base, ResNet-18 at 224x224) are the script's own run
(docs/results/usual-sizes.md); here its logic runs on the reduced configs: "tiny" in CI, "small"
(about 10M parameters, short batches) as a slow test.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from lmech.errors import LmechError, MemoryBudgetError  # noqa: E402
from lmech.integrations import zoo  # noqa: E402
from lmech.probes import hessian_spectral_density, hessian_trace, sharpness  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "usual_sizes.py"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("usual_sizes", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["usual_sizes"] = mod  # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("usual_sizes", None)


def check_rows(rows, script):
    assert rows
    for r in rows:
        assert r.status in ("works", "refused"), (r.model, r.probe, r.value)
        if r.status == "refused":
            assert script.is_refusal(r.error) and "\n" not in r.value, (r.probe, r.value)
        elif isinstance(r.headline, float):
            assert math.isfinite(r.headline), (r.probe, r.value)
        assert r.seconds >= 0


def test_refusal_classification(script):
    with pytest.raises(MemoryBudgetError) as budget:
        sharpness(nn.Linear(3, 1), lambda o, y: o.pow(2).mean(), (torch.randn(4, 3), None), max_bytes=1)
    assert script.is_refusal(budget.value)
    with pytest.raises(RuntimeError) as raw:  # a shape error out of torch itself: a defect
        torch.randn(2, 3) @ torch.randn(2, 3)
    assert not script.is_refusal(raw.value)
    assert not script.is_refusal(LmechError("two\nlines"))


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_every_probe_works_or_refuses_on_tiny_models(script, name):
    z = zoo.ZOO[name]("tiny", examples=4)
    rows = script.run_model(z, name, log=lambda line: None)
    check_rows(rows, script)
    probes = {r.probe for r in rows}
    assert {"sharpness top-1", "Hessian trace", "spectral density", "NTK", "gradient noise", "weights",
            "representations", "Monitor economy"} <= probes
    assert all(r.status == "works" for r in rows), [r.value for r in rows if r.status != "works"]


def test_train_mode_batchnorm_refusals_name_the_fix(script):
    z = zoo.resnet18("tiny", examples=4)
    rows = {r.probe: r for r in script.run_model(z, "resnet", train_mode=True, log=lambda line: None)}
    check_rows(list(rows.values()), script)
    for probe in ("NTK", "gradient noise"):
        assert rows[probe].status == "refused" and "call model.eval() first" in rows[probe].value
    assert rows["sharpness top-1"].status == "works"  # the Hessian of the batch-statistics loss


def test_memory_refusals_come_before_any_forward_pass():
    """The Hessian probes check their basis or sketch against the budget before the gradient
    with create_graph is built (the operator builds it at its first product)."""
    z = zoo.gpt2("tiny", examples=4)
    calls = []
    handle = z.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        for probe in (sharpness, hessian_trace, hessian_spectral_density):
            with pytest.raises(MemoryBudgetError):
                probe(z.model, z.loss_fn, z.batch, output="logits", max_bytes=64)
    finally:
        handle.remove()
    assert calls == []


def test_memory_refusals_get_the_fix_their_message_names(script):
    """Under a budget of 12 parameter vectors, the default Lanczos basis (81), the Hutch++ sketch
    (30) and a 20-step SLQ basis are refused in one line; the fix (fewer steps, Hutchinson) works."""
    z = zoo.bert("tiny", examples=4)
    budget = 4 * z.num_params * 12
    rows = [r for r in script.run_model(z, "bert", log=lambda line: None, budget=budget)
            if r.probe in ("sharpness top-1", "Hessian trace", "spectral density")]
    check_rows(rows, script)
    assert [r.status for r in rows] == ["refused", "works"] * 3
    assert all(isinstance(r.error, MemoryBudgetError) for r in rows[::2])
    assert rows[1].call.startswith("max_iter=11") and "hutchinson" in rows[3].call and "num_steps=11" in rows[5].call


@pytest.mark.slow
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_every_probe_works_or_refuses_on_small_models(script, name):
    kw = {"image": 32} if name == "resnet18" else {"seq": 16}
    z = zoo.ZOO[name]("small", examples=4, **kw)
    check_rows(script.run_model(z, name, log=lambda line: None), script)


def test_layer_features_in_train_mode_leave_batchnorm_statistics():
    """Reading features of a model in training mode uses the batch statistics and restores the
    running statistics it wrote (a probe leaves the model as it was)."""
    from lmech.probes import layer_features

    z = zoo.resnet18("tiny", examples=4)
    z.model.train()
    before = {n: b.clone() for n, b in z.model.named_buffers()}
    pixels = {"pixel_values": z.batch["pixel_values"]}
    feats = layer_features(z.model, pixels)
    assert all(torch.equal(b, before[n]) for n, b in z.model.named_buffers())
    z.model.eval()
    assert not torch.allclose(feats["classifier.1"], layer_features(z.model, pixels)["classifier.1"])
