"""Modular arithmetic: the grokking task of Power et al. (2022).

Every equation ``a OP b = c (mod p)`` for a prime ``p`` is one example; a random fraction of
all equations is the training set and the rest the test set.
"""

from __future__ import annotations

import torch

from .base import TaskData, stream_seed

__all__ = ["modular_arithmetic"]

_OPS = ("+", "-", "*", "/")


def _is_prime(p: int) -> bool:
    if p < 2:
        return False
    i = 2
    while i * i <= p:
        if p % i == 0:
            return False
        i += 1
    return True


def modular_arithmetic(
    p: int = 97,
    op: str = "+",
    train_fraction: float = 0.3,
    encoding: str = "tokens",
    seed: int = 0,
) -> TaskData:
    """All equations ``a OP b = c (mod p)``, split at random into train and test.

    Source: Power, Burda, Edwards, Babuschkin & Misra, *Grokking: Generalization beyond
    overfitting on small algorithmic datasets* (2022); the token format follows Nanda et al.
    (2023), *Progress measures for grokking via mechanistic interpretability*.

    Operations (``p`` must be prime):

    - ``"+"``, ``"-"``, ``"*"``: ``a, b`` range over ``0..p-1`` (``p**2`` equations);
      ``c = a + b``, ``a - b``, ``a * b`` mod ``p``.
    - ``"/"``: ``a`` over ``0..p-1`` and ``b`` over ``1..p-1`` (``p*(p-1)`` equations);
      ``c = a * b^{-1} mod p`` (inverse by Fermat, ``b^{p-2}``).

    Encodings:

    - ``"tokens"``: ``x`` is int64 ``(N, 4)`` = ``[a, OP, b, EQ]`` with the OP token id ``p``
      and the EQ token id ``p + 1``; vocabulary size ``p + 2`` (``info["vocab_size"]``),
      ``info["seq_len"] = 4``. Feed to a causal transformer and read the last position.
    - ``"onehot"``: ``x`` is float32 ``(N, 2p)`` = ``concat(onehot(a), onehot(b))``, for MLPs.

    Targets ``y = c`` are int64 class ids, ``num_classes = p``. The split is a seeded random
    permutation of all equations (own ``torch.Generator``); the first
    ``round(train_fraction * N)`` equations are the training set, so for a fixed seed the
    training sets of increasing ``train_fraction`` are nested. The rows of each split are in
    that random order.

    Sizes: p=97, "+" -> 9409 equations (30 %: 2823 train, 6586 test);
    p=97, "/" -> 9312 equations (25 %: 2328 train, 6984 test).

    ``info`` holds ``p, op, train_fraction, encoding, n_total, vocab_size, seq_len`` (token
    encoding: also ``op_token, eq_token``) and ``seed``.

    Example:
        >>> data = modular_arithmetic(p=97, op="/", train_fraction=0.25)
        >>> data.x_train.shape, data.y_train.shape, data.info["vocab_size"]
        (torch.Size([2328, 4]), torch.Size([2328]), 99)
    """
    p = int(p)
    if not _is_prime(p):
        raise ValueError(f"p must be a prime, got {p}")
    if op not in _OPS:
        raise ValueError(f"op must be one of {_OPS}, got {op!r}")
    if not 0.0 < float(train_fraction) < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if encoding not in ("tokens", "onehot"):
        raise ValueError(f"encoding must be 'tokens' or 'onehot', got {encoding!r}")

    b_lo = 1 if op == "/" else 0
    a = torch.arange(p).repeat_interleave(p - b_lo)
    b = torch.arange(b_lo, p).repeat(p)
    if op == "+":
        c = (a + b) % p
    elif op == "-":
        c = (a - b) % p
    elif op == "*":
        c = (a * b) % p
    else:
        inv = torch.tensor([0] + [pow(int(v), p - 2, p) for v in range(1, p)], dtype=torch.long)
        c = (a * inv[b]) % p

    n_total = int(a.numel())
    n_train = int(round(float(train_fraction) * n_total))
    if not 0 < n_train < n_total:
        raise ValueError(
            f"train_fraction={train_fraction} leaves {n_train} of {n_total} equations for training"
        )
    gen = torch.Generator().manual_seed(stream_seed(seed, 0))
    perm = torch.randperm(n_total, generator=gen)
    a, b, c = a[perm], b[perm], c[perm]

    info: dict = {
        "p": p,
        "op": op,
        "train_fraction": float(train_fraction),
        "encoding": encoding,
        "n_total": n_total,
        "seed": int(seed),
    }
    if encoding == "tokens":
        x = torch.stack(
            [a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=1
        ).to(torch.long)
        info.update(vocab_size=p + 2, seq_len=4, op_token=p, eq_token=p + 1)
    else:
        x = torch.zeros(n_total, 2 * p, dtype=torch.float32)
        rows = torch.arange(n_total)
        x[rows, a] = 1.0
        x[rows, p + b] = 1.0
    y = c.to(torch.long)
    return TaskData(
        name="modular_arithmetic",
        x_train=x[:n_train].contiguous(),
        y_train=y[:n_train].contiguous(),
        x_test=x[n_train:].contiguous(),
        y_test=y[n_train:].contiguous(),
        kind="classification",
        num_classes=p,
        info=info,
    )
