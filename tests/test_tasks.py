"""Tests for lmech.tasks: determinism, sizes, label correctness, label noise, global RNG hygiene."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from lmech.tasks import (
    TASKS,
    TaskData,
    add_label_noise,
    digits,
    get_task,
    make_teacher,
    mnist1d,
    modular_arithmetic,
    sparse_parity,
    teacher_student,
)

TENSOR_FIELDS = ("x_train", "y_train", "x_test", "y_test", "groups_train", "groups_test")

SMALL = {
    "modular_arithmetic": dict(p=11, op="+", train_fraction=0.5),
    "teacher_student": dict(n_train=32, n_test=64, d_in=4, noise_std=0.1),
    "sparse_parity": dict(n_tasks=4, n_bits=10, k=3, n_train=200, n_test=80),
    "mnist1d": dict(n_train=150, n_test=50),
    "digits": dict(),
}


def same(a: TaskData, b: TaskData) -> bool:
    for f in TENSOR_FIELDS:
        ta, tb = getattr(a, f), getattr(b, f)
        if (ta is None) != (tb is None):
            return False
        if ta is not None and not torch.equal(ta, tb):
            return False
    return a.info == b.info


def global_states():
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def assert_states_equal(before, after):
    assert torch.equal(before[0], after[0]), "torch global RNG state changed"
    np_b, np_a = before[1], after[1]
    assert np_b[0] == np_a[0] and np.array_equal(np_b[1], np_a[1]) and np_b[2:] == np_a[2:], (
        "numpy global RNG state changed"
    )
    assert before[2] == after[2], "python random state changed"


# --------------------------------------------------------------------------- all tasks
@pytest.mark.parametrize("name", sorted(SMALL))
def test_determinism_and_hygiene(name):
    kw = SMALL[name]
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = global_states()
    a = get_task(name, seed=0, **kw)
    b = get_task(name, seed=0, **kw)
    c = get_task(name, seed=1, **kw)
    assert_states_equal(before, global_states())
    assert same(a, b)
    assert not torch.equal(a.x_train, c.x_train) or not torch.equal(a.y_train, c.y_train)
    json.dumps(a.info)  # info is JSON-serializable
    assert a.n_train == len(a.y_train) and a.n_test == len(a.y_test)
    if a.kind == "classification":
        assert a.y_train.dtype == torch.long and a.num_classes is not None
        assert int(a.y_train.min()) >= 0 and int(a.y_train.max()) < a.num_classes
    else:
        assert a.y_train.dtype == torch.float32 and a.num_classes is None


def test_registry_names_and_unknown():
    assert set(TASKS) == {"modular_arithmetic", "teacher_student", "sparse_parity", "mnist1d", "digits"}
    assert get_task("modular-arithmetic", p=5).n_train > 0
    with pytest.raises(ValueError, match="valid names:.*digits"):
        get_task("cifar10")


# --------------------------------------------------------------------------- modular arithmetic
def _pairs(x: torch.Tensor, p: int, encoding: str) -> set[tuple[int, int]]:
    if encoding == "tokens":
        return set(zip(x[:, 0].tolist(), x[:, 2].tolist()))
    return set(zip(x[:, :p].argmax(1).tolist(), x[:, p:].argmax(1).tolist()))


def test_modular_sizes_division():
    d = modular_arithmetic(p=97, op="/", train_fraction=0.25, seed=0)
    assert d.n_train == 2328 and d.n_test == 6984
    assert d.info["vocab_size"] == 99 and d.info["seq_len"] == 4
    assert d.x_train.dtype == torch.long and d.x_train.shape == (2328, 4)
    assert (d.x_train[:, 1] == 97).all() and (d.x_train[:, 3] == 98).all()
    tr, te = _pairs(d.x_train, 97, "tokens"), _pairs(d.x_test, 97, "tokens")
    assert len(tr) == 2328 and len(te) == 6984 and not tr & te
    assert all(b != 0 for _, b in tr | te)
    assert len(tr | te) == 97 * 96


@pytest.mark.parametrize("op", ["+", "-", "*", "/"])
@pytest.mark.parametrize("encoding", ["tokens", "onehot"])
def test_modular_labels(op, encoding):
    p = 13
    d = modular_arithmetic(p=p, op=op, train_fraction=0.5, encoding=encoding, seed=3)
    n_total = p * (p - 1) if op == "/" else p * p
    assert d.n_train + d.n_test == n_total
    for x, y in ((d.x_train, d.y_train), (d.x_test, d.y_test)):
        if encoding == "tokens":
            a, b = x[:, 0].tolist(), x[:, 2].tolist()
        else:
            assert x.dtype == torch.float32 and x.shape[1] == 2 * p
            assert torch.equal(x.sum(1), torch.full((len(x),), 2.0))
            a, b = x[:, :p].argmax(1).tolist(), x[:, p:].argmax(1).tolist()
        for ai, bi, ci in zip(a, b, y.tolist()):
            if op == "+":
                assert ci == (ai + bi) % p
            elif op == "-":
                assert ci == (ai - bi) % p
            elif op == "*":
                assert ci == (ai * bi) % p
            else:
                assert (ci * bi) % p == ai  # c = a / b  <=>  c * b = a
    assert not _pairs(d.x_train, p, encoding) & _pairs(d.x_test, p, encoding)


def test_modular_nested_and_errors():
    small = modular_arithmetic(p=11, train_fraction=0.2, seed=5)
    big = modular_arithmetic(p=11, train_fraction=0.6, seed=5)
    assert torch.equal(big.x_train[: small.n_train], small.x_train)
    with pytest.raises(ValueError):
        modular_arithmetic(p=12)
    with pytest.raises(ValueError):
        modular_arithmetic(p=11, op="^")
    with pytest.raises(ValueError):
        modular_arithmetic(p=11, train_fraction=1.0)


# --------------------------------------------------------------------------- teacher-student
def test_teacher_student_targets_and_noise():
    kw = dict(n_test=100, d_in=5, d_out=2, teacher_width=7, teacher_depth=2, activation="tanh", seed=4)
    clean = teacher_student(n_train=50, noise_std=0.0, **kw)
    noisy = teacher_student(n_train=50, noise_std=0.5, **kw)
    assert clean.x_train.shape == (50, 5) and clean.y_train.shape == (50, 2)
    assert clean.y_test.shape == (100, 2) and clean.x_train.dtype == torch.float32
    f = make_teacher(d_in=5, d_out=2, teacher_width=7, teacher_depth=2, activation="tanh", seed=4)
    torch.testing.assert_close(f(clean.x_train).float(), clean.y_train)
    torch.testing.assert_close(f(clean.x_test).float(), clean.y_test)
    # noise on train targets only
    assert torch.equal(noisy.x_train, clean.x_train) and torch.equal(noisy.y_test, clean.y_test)
    resid = noisy.y_train - clean.y_train
    assert 0.3 < float(resid.std()) < 0.7
    assert noisy.info["noise_std"] == 0.5
    # the teacher and the test set do not depend on n_train; train sets are nested
    more = teacher_student(n_train=80, noise_std=0.5, **kw)
    assert torch.equal(more.x_test, noisy.x_test) and torch.equal(more.y_test, noisy.y_test)
    assert torch.equal(more.x_train[:50], noisy.x_train)
    assert torch.equal(more.y_train[:50], noisy.y_train)


def test_teacher_linear():
    d = teacher_student(n_train=20, n_test=10, d_in=3, teacher_depth=0, seed=2)
    w = torch.linalg.lstsq(d.x_train.double(), d.y_train.double()).solution
    torch.testing.assert_close((d.x_test.double() @ w).float(), d.y_test, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- label noise
def test_label_noise_classification():
    base = modular_arithmetic(p=11, train_fraction=0.5, seed=0)
    q = 0.3
    noisy = add_label_noise(base, q, seed=7)
    m = round(q * base.n_train)
    assert noisy.corrupted.dtype == torch.bool and int(noisy.corrupted.sum()) == m
    assert torch.equal(noisy.y_train_clean, base.y_train)
    changed = noisy.y_train != noisy.y_train_clean
    assert torch.equal(changed, noisy.corrupted)  # every corrupted label differs, no others
    assert int(noisy.y_train.max()) < 11 and int(noisy.y_train.min()) >= 0
    assert torch.equal(noisy.x_test, base.x_test) and torch.equal(noisy.y_test, base.y_test)
    assert torch.equal(noisy.x_train, base.x_train)
    assert base.corrupted is None and base.y_train_clean is None  # input not modified
    assert noisy.info["label_noise"]["n_corrupted"] == m
    json.dumps(noisy.info)
    # deterministic, seed-dependent
    assert torch.equal(add_label_noise(base, q, seed=7).y_train, noisy.y_train)
    assert not torch.equal(add_label_noise(base, q, seed=8).corrupted, noisy.corrupted)


def test_label_noise_regression_edges_and_errors():
    base = teacher_student(n_train=40, n_test=10, d_in=3, seed=0)
    noisy = add_label_noise(base, 0.25, seed=1, scale=2.0)
    assert int(noisy.corrupted.sum()) == 10
    diff = (noisy.y_train - base.y_train).abs().sum(1)
    assert bool((diff[noisy.corrupted] > 0).all()) and bool((diff[~noisy.corrupted] == 0).all())
    assert torch.equal(noisy.y_test, base.y_test)
    default = add_label_noise(base, 0.25, seed=1)
    assert default.info["label_noise"]["scale"] == pytest.approx(float(base.y_train.double().std()))
    assert int(add_label_noise(base, 0.0).corrupted.sum()) == 0
    assert int(add_label_noise(base, 1.0).corrupted.sum()) == 40
    for q in (-0.1, 1.5):
        with pytest.raises(ValueError):
            add_label_noise(base, q)
    with pytest.raises(ValueError):
        add_label_noise(noisy, 0.1)


# --------------------------------------------------------------------------- sparse parity
def test_sparse_parity_labels_and_layout():
    n_tasks, n_bits, k = 5, 12, 3
    d = sparse_parity(n_tasks=n_tasks, n_bits=n_bits, k=k, n_train=500, n_test=203, seed=2)
    assert d.x_train.shape == (500, n_tasks + n_bits) and d.num_classes == 2
    subsets = d.info["subsets"]
    assert len(subsets) == n_tasks and len({tuple(s) for s in subsets}) == n_tasks
    assert all(len(s) == k and len(set(s)) == k for s in subsets)
    for x, y, g in ((d.x_train, d.y_train, d.groups_train), (d.x_test, d.y_test, d.groups_test)):
        assert torch.equal(x[:, :n_tasks].argmax(1), g)
        assert torch.equal(x[:, :n_tasks].sum(1), torch.ones(len(x)))
        bits = x[:, n_tasks:].long()
        assert set(bits.unique().tolist()) <= {0, 1}
        for i in range(len(x)):
            assert int(y[i]) == int(bits[i, subsets[int(g[i])]].sum()) % 2
    # test set balanced over tasks; train follows the Zipf frequencies (task 0 most frequent)
    counts = d.groups_test.bincount(minlength=n_tasks)
    assert int(counts.max() - counts.min()) <= 1
    freqs = np.array(d.info["frequencies"])
    assert freqs.sum() == pytest.approx(1.0)
    assert freqs[0] / freqs[1] == pytest.approx(2 ** 1.5)
    assert d.groups_train.bincount(minlength=n_tasks).argmax() == 0
    # nested training sets, test set independent of n_train
    more = sparse_parity(n_tasks=n_tasks, n_bits=n_bits, k=k, n_train=700, n_test=203, seed=2)
    assert torch.equal(more.x_train[:500], d.x_train) and torch.equal(more.x_test, d.x_test)


# --------------------------------------------------------------------------- mnist1d / digits
def test_mnist1d_shapes_and_global_state():
    np.random.seed(7)
    random.seed(7)
    before = global_states()
    d = mnist1d(n_train=150, n_test=50, seed=3)
    assert_states_equal(before, global_states())
    assert d.x_train.shape == (150, 40) and d.x_test.shape == (50, 40)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.long
    assert d.num_classes == 10 and set(d.y_train.unique().tolist()) <= set(range(10))
    # cached arrays are not shared with the returned tensors
    d.x_train.zero_()
    assert not torch.equal(mnist1d(n_train=150, n_test=50, seed=3).x_train, d.x_train)
    # a size that is not a multiple of 10 still gives exactly the requested counts
    odd = mnist1d(n_train=33, n_test=11, seed=3)
    assert odd.n_train == 33 and odd.n_test == 11


def test_digits_shapes_and_standardization():
    d = digits(test_fraction=0.25, seed=0)
    assert d.x_train.shape == (1348, 64) and d.x_test.shape == (449, 64)
    assert d.x_train.dtype == torch.float32 and d.num_classes == 10
    assert d.x_train.mean(0).abs().max() < 1e-4
    std = d.x_train.std(0, unbiased=False)
    assert bool((((std - 1).abs() < 1e-4) | (std < 1e-6)).all())
    assert set(d.y_train.unique().tolist()) == set(range(10))
