"""Label noise: corrupt an exact fraction of the training targets of any task."""

from __future__ import annotations

import torch

from .base import TaskData, stream_seed

__all__ = ["add_label_noise"]


def add_label_noise(
    data: TaskData, q: float, seed: int = 0, scale: float | None = None
) -> TaskData:
    """A copy of ``data`` with exactly ``round(q * n_train)`` training targets corrupted.

    The corrupted examples are a uniformly random subset (own ``torch.Generator`` seeded from
    ``seed``; Python's ``round``, so halves go to the even number). Then:

    - **classification**: each corrupted label is replaced by a class drawn uniformly from the
      ``num_classes - 1`` *other* classes (``y' = (y + U{1..K-1}) mod K``), so every corrupted
      label differs from its clean label;
    - **regression**: Gaussian noise of standard deviation ``scale`` is added to every output
      coordinate of a corrupted example; ``scale`` defaults to the standard deviation of
      ``y_train`` (over all its entries).

    The returned task has ``y_train_clean`` (the original targets), ``corrupted`` (bool mask
    over training examples) and ``info["label_noise"] = {"q", "seed", "n_corrupted", "scale"}``.
    Inputs, groups and the test set are shared with ``data``, unchanged. Applying label noise
    to a task that already has it is refused (ValueError), as the meaning of "clean" would blur.

    This is the setting of Zhang et al. (2017), *Understanding deep learning requires
    rethinking generalization*, and of epoch-wise double descent (Nakkiran et al. 2020).

    Example:
        >>> from lmech.tasks import digits, add_label_noise
        >>> noisy = add_label_noise(digits(), q=0.2, seed=1)
        >>> int(noisy.corrupted.sum()) == round(0.2 * noisy.n_train)
        True
    """
    q = float(q)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if data.corrupted is not None or data.y_train_clean is not None:
        raise ValueError("data already has label noise (corrupted is set); start from clean data")
    n = data.n_train
    m = int(round(q * n))
    gen = torch.Generator().manual_seed(stream_seed(seed, 0))
    idx = torch.randperm(n, generator=gen)[:m]
    corrupted = torch.zeros(n, dtype=torch.bool)
    corrupted[idx] = True

    y_clean = data.y_train
    y = y_clean.clone()
    noise_info: dict = {"q": q, "seed": int(seed), "n_corrupted": m}
    if data.kind == "classification":
        k = int(data.num_classes)  # type: ignore[arg-type]
        if k < 2 and m > 0:
            raise ValueError("label noise needs at least 2 classes")
        if m > 0:
            shift = torch.randint(1, k, (m,), generator=gen, dtype=y.dtype)
            y[idx] = (y_clean[idx] + shift) % k
        noise_info["scale"] = None
    else:
        if scale is None:
            s = float(y_clean.double().std()) if y_clean.numel() > 1 else 1.0
        else:
            s = float(scale)
        if s < 0:
            raise ValueError(f"scale must be >= 0, got {s}")
        if m > 0:
            eps = torch.randn((m,) + tuple(y.shape[1:]), generator=gen, dtype=torch.float64)
            y[idx] = (y_clean[idx].double() + s * eps).to(y.dtype)
        noise_info["scale"] = s

    info = dict(data.info)
    info["label_noise"] = noise_info
    return data.replace(y_train=y, y_train_clean=y_clean, corrupted=corrupted, info=info)
