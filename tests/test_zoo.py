"""The model zoo: third-party models (transformers GPT-2, BERT, a BatchNorm ResNet-18) built from
configs with random weights, fed dict batches (``model(**batch)``) with ``output="logits"``.

Reduced ("tiny") configs in float64: every probe's value against a brute-force computation (the
explicit Hessian ``torch.func.hessian``, the explicit Jacobian ``torch.func.jacrev`` of the whole
batch, per-example gradients by a Python loop of ``torch.autograd.grad``, the hidden states the
model returns itself). The usual sizes are in ``scripts/usual_sizes.py`` and the slow test at the
end; a "small" (about 10M parameters) GPT-2 runs the economy Monitor in CI.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import functional_call

pytest.importorskip("transformers")

from lmech import Monitor  # noqa: E402
from lmech.core import differentiable_kernels, flatten, hvp, per_example_grads  # noqa: E402
from lmech.integrations import zoo  # noqa: E402
from lmech.probes import PathRecorder, grad_noise, hessian_trace, layer_features, ntk, sharpness  # noqa: E402
from lmech.probes.weights import spectral_norm  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")
TINY = {"gpt2": lambda: zoo.gpt2("tiny", examples=4, dtype=torch.float64),
        "bert": lambda: zoo.bert("tiny", examples=4, dtype=torch.float64),
        "resnet18": lambda: zoo.resnet18("tiny", examples=4, dtype=torch.float64)}


def flat_loss(z, batch=None):
    """w -> loss(model(**batch; w)) on a flat vector of every parameter (brute force)."""
    batch = z.batch if batch is None else batch
    named = dict(z.model.named_parameters())
    names, shapes = list(named), [p.shape for p in named.values()]
    sizes = [p.numel() for p in named.values()]
    buffers = dict(z.model.named_buffers())

    def f(w):
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(w, sizes), shapes)}
        fresh = {n: b.clone() for n, b in buffers.items()}  # train-mode BatchNorm writes to them
        out = functional_call(z.model, {**params, **fresh}, (), dict(batch), tie_weights=True)
        return out.logits

    w0 = flatten({n: p.detach() for n, p in named.items()})
    return f, w0, names


def explicit_hessian(z):
    # jacrev(grad): torch.func.hessian (jacfwd(jacrev)) and jacrev(jacrev) return a wrong,
    # asymmetric matrix on the tiny GPT-2 (torch 2.13; entries off by 0.06 where central finite
    # differences agree with jacrev(grad) to 1e-10), so the brute force is reverse-over-grad
    f, w0, _ = flat_loss(z)
    with differentiable_kernels():  # SDPA's math backend (the fused kernel has no double backward)
        return torch.func.jacrev(torch.func.grad(lambda w: z.loss_fn(f(w), z.batch)))(w0)


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request):
    return TINY[request.param]()


def test_tiny_sizes(tiny):
    assert 500 < tiny.num_params < 3000, tiny.num_params  # small enough for explicit matrices


def test_sharpness_and_trace_against_explicit_hessian(tiny):
    H = explicit_hessian(tiny)
    assert torch.allclose(H, H.T, atol=1e-10)
    # lmech.core.hvp (forward-over-reverse) against a column of the explicit Hessian (of the last
    # coordinate: not an embedding row at padding_idx, whose autograd gradient is zeroed by
    # nn.Embedding while forward mode carries its tangent, so the two differ there)
    v = {n: torch.zeros_like(p) for n, p in tiny.model.named_parameters()}
    last = list(v)[-1]
    v[last].view(-1)[-1] = 1.0
    hv = hvp(tiny.model, tiny.loss_fn, tiny.batch, None, v, output="logits")
    assert torch.allclose(flatten(hv), H[:, -1], rtol=1e-8, atol=1e-10)
    top = torch.linalg.eigvalsh(H).flip(0)[:2]
    res = sharpness(tiny.model, tiny.loss_fn, tiny.batch, k=2, tol=1e-10, max_iter=400, output="logits")
    assert torch.allclose(res.eigenvalues, top, rtol=1e-7, atol=1e-9)
    # trace of a small diagonal block, exact by Hutch++ with 3 x its dimension of products
    names = [n for n, _ in tiny.model.named_parameters()]
    block = next(n for n in reversed(names) if n.endswith("bias") or "ln" in n)
    sizes = {n: p.numel() for n, p in tiny.model.named_parameters()}
    start = sum(sizes[n] for n in names[:names.index(block)])
    d = sizes[block]
    est = hessian_trace(tiny.model, tiny.loss_fn, tiny.batch, block, num_matvecs=3 * d, output="logits")
    assert est.value == pytest.approx(float(torch.trace(H[start:start + d, start:start + d])), rel=1e-8, abs=1e-12)


def test_ntk_against_explicit_jacobian(tiny):
    f, w0, _ = flat_loss(tiny)
    J = torch.func.jacrev(f)(w0)  # (n, *out, P), the whole batch at once
    n = J.shape[0]
    J = J.reshape(n, -1, J.shape[-1])
    explicit = torch.einsum("iap,jbp->iajb", J, J).reshape(n * J.shape[1], -1)
    inputs = {k: v for k, v in tiny.batch.items() if k != "labels"}
    for impl in ("jacobian", "products"):
        K = ntk(tiny.model, inputs, impl, output="logits")
        assert torch.allclose(K, explicit, rtol=1e-9, atol=1e-11), impl
    traced = ntk(tiny.model, inputs, trace_outputs=True, output="logits")
    assert torch.allclose(traced, torch.einsum("iap,jap->ij", J, J), rtol=1e-9, atol=1e-11)


def per_example_loop(z):
    """g_i by autograd on each example alone (a batch of one), as rows of a (b, P) matrix."""
    params = list(z.model.parameters())
    b = next(iter(z.batch.values())).shape[0]
    rows = []
    for i in range(b):
        one = {k: v[i:i + 1] for k, v in z.batch.items()}
        loss = z.loss_fn(z.model(**one).logits, one)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def test_grad_noise_and_per_example_grads_against_a_loop(tiny):
    G = per_example_loop(tiny)  # (b, P)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BERT's padding mask: vmap falls back to a loop (warned)
        pe = per_example_grads(tiny.model, tiny.loss_fn, tiny.batch, None, output="logits")
        gn = grad_noise(tiny.model, tiny.loss_fn, tiny.batch, output="logits")
    assert torch.allclose(torch.cat([t.reshape(t.shape[0], -1) for t in pe.values()], 1), G, atol=1e-12)
    b = G.shape[0]
    mean, var = G.mean(0), G.var(0)  # unbiased per-coordinate variance
    assert torch.allclose(gn.flat_mean, mean, atol=1e-12)
    assert gn.total.grad_norm_sq == pytest.approx(float(mean @ mean), rel=1e-9)
    assert gn.total.trace_cov == pytest.approx(float(var.sum()), rel=1e-9)
    snr = float(mean @ mean) / (float(var.sum()) / b)
    assert gn.total.snr == pytest.approx(snr, rel=1e-9)


def test_layer_features_are_the_models_hidden_states():
    z = TINY["gpt2"]()
    blocks = [f"transformer.h.{i}" for i in range(z.model.config.n_layer)]
    feats = layer_features(z.model, z.batch, blocks)
    with torch.no_grad():
        hidden = z.model(**z.batch, output_hidden_states=True).hidden_states
    for i, name in enumerate(blocks[:-1]):  # the last hidden state is after ln_f
        assert torch.equal(feats[name], hidden[i + 1].reshape(hidden[i + 1].shape[0], -1))


def test_weights_probe_spectral_norms():
    z = TINY["bert"]()
    mon = Monitor(z.model, z.loss_fn, z.batch, probes="economy", output="logits", every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = mon.step(0)
    checked = 0
    for name, p in z.model.named_parameters():
        key = f"weights/spectral_norm/{name}"
        if p.dim() == 2 and key in metrics:
            assert metrics[key] == pytest.approx(float(torch.linalg.matrix_norm(p.detach(), ord=2)), rel=1e-3)
            checked += 1
    assert checked >= 4
    assert metrics["probe/loss"] == pytest.approx(float(z.loss_fn(z.model(**z.batch).logits, z.batch)), rel=1e-12)
    assert spectral_norm(z.model.classifier.weight.detach()) > 0


def test_path_recorder_driving_kernel_is_the_ntk():
    z = TINY["bert"]()
    inputs = {k: v for k, v in z.batch.items() if k != "labels"}
    x_S = {k: v[:3] for k, v in inputs.items()}
    x_Q = {k: v[3:] for k, v in inputs.items()}
    y_S = z.batch["labels"][:3]
    rec = PathRecorder(z.model, x_S, y_S, x_Q, loss="cross_entropy", output="logits")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec.start()
        opt = torch.optim.SGD(z.model.parameters(), lr=1e-12)  # a step that leaves the kernel as it is
        opt.zero_grad()
        rec.loss_fn(z.model(**x_S).logits, y_S).backward()
        opt.step()
        rec.step(1e-12)
        K = ntk(z.model, x_S, "jacobian", output="logits")  # (3 * 3 classes)^2
    assert torch.allclose(rec.K0.to(K.dtype), K, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", list(TINY))
def test_monitor_full_preset_on_dict_batches(name):
    z = TINY[name]()
    mon = Monitor(z.model, z.loss_fn, z.batch, probes="full", output="logits", every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = mon.step(0)
    for key in ("sharpness/lambda_1", "hessian_trace/trace", "ntk/trace", "gradnoise/snr", "weights/stable_rank_mean"):
        prefix = key.split("/")[0]
        assert any(k.startswith(prefix + "/") for k in m), key
    # the per-layer names are the model's own (no wrapper prefix)
    first = next(n for n, _ in z.model.named_parameters()).rpartition(".")[0]
    assert any(k.endswith("/" + first) for k in m), first


def test_resnet_train_mode_batchnorm():
    """What each probe does with BatchNorm in training mode (called directly: the Monitor always
    measures in eval mode): Hessian products and the loss use the batch statistics (and update
    the running statistics on copies only); the NTK refuses, naming model.eval() as the fix."""
    z = TINY["resnet18"]()
    z.model.train()
    running = {n: b.clone() for n, b in z.model.named_buffers()}
    res = sharpness(z.model, z.loss_fn, z.batch, tol=1e-6, output="logits")
    H = explicit_hessian(z)  # brute force in train mode: batch statistics as well
    assert float(res.eigenvalues[0]) == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-5)
    assert all(torch.equal(b, running[n]) for n, b in z.model.named_buffers())
    inputs = {"pixel_values": z.batch["pixel_values"]}
    with pytest.raises(ValueError, match=r"BatchNorm2d is in training mode.*call model.eval\(\) first"):
        ntk(z.model, inputs, output="logits")


def test_non_tensor_output_refusal_names_the_fix():
    z = TINY["gpt2"]()
    with pytest.raises(TypeError, match=r"CausalLMOutput\w* \(fields: logits.*pass output='logits'"):
        ntk(z.model, z.batch)
    with pytest.raises(ValueError, match="no field 'logit'"):
        sharpness(z.model, z.loss_fn, z.batch, output="logit")


def test_small_gpt2_economy_monitor():
    """A GPT-2 of about 10M parameters (the benchmark's): the economy preset at its default
    budget measures every probe."""
    z = zoo.gpt2("small", examples=8, seq=16)
    assert 9e6 < z.num_params < 12e6
    mon = Monitor(z.model, z.loss_fn, z.batch, probes="economy", output="logits", every=1)
    m = mon.step(0)
    for key in ("probe/loss", "gradnoise/snr", "sharpness/lambda_1", "weights/stable_rank_mean"):
        prefix = key.split("/")[0]
        assert any(k.startswith(prefix + "/") for k in m), key


