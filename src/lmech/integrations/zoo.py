"""Third-party models built from configs with random weights (nothing is downloaded), with a
probe batch and a loss for each: the model zoo of the integration tests and of
``scripts/usual_sizes.py``.

Needs ``transformers`` (extra ``lmech[hf]``). The ResNet-18 is ``transformers``'
``ResNetForImageClassification`` from a ``ResNetConfig`` with ResNet-18's widths and depths
(basic blocks, BatchNorm): torchvision has no CPU wheel for torch 2.13 on the package
registry (its PyPI build is a CUDA build that pulls another torch), so its ResNet-18 is not used.

Every entry is a :class:`ZooModel`: ``model`` (in ``eval()`` mode), ``batch`` in the form a
Hugging Face data collator gives (a dict of tensors, examples along dim 0; ``model(**batch)``),
``loss_fn(logits, batch)`` and ``output="logits"``, the option every probe and the Monitor take:

.. code-block:: python

    from lmech.integrations.zoo import gpt2
    z = gpt2("tiny")
    lmech.probes.sharpness(z.model, z.loss_fn, z.batch, output=z.output)

Sizes: ``"tiny"`` (a few thousand parameters: brute-force checks against explicit Hessians and
Jacobians), ``"small"`` (about 10M parameters), ``"base"`` (the published small size: GPT-2
124M, BERT-base 110M, ResNet-18 11.2M at 10 classes, 11.7M with 1,000).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

try:
    import transformers
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise ImportError("lmech.integrations.zoo needs transformers: pip install 'lmech[hf]'") from e

__all__ = ["ZooModel", "gpt2", "bert", "resnet18", "ZOO"]

Size = Literal["tiny", "small", "base"]


@dataclass
class ZooModel:
    """A model, a probe batch (a dict), its loss ``loss_fn(logits, batch)`` and ``output``."""

    name: str
    model: nn.Module
    batch: dict
    loss_fn: Callable
    output: str = "logits"

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _quiet(cfg_cls, **kw):
    transformers.logging.set_verbosity_error()
    return cfg_cls(**kw)


def causal_lm_loss(logits, batch):
    """Next-token cross-entropy, mean over the predicted positions (as GPT-2 computes it)."""
    ids = batch["input_ids"]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def classification_loss(logits, batch):
    """Mean cross-entropy of the class logits against ``batch["labels"]``."""
    return F.cross_entropy(logits, batch["labels"])


def gpt2(size: Size = "tiny", *, examples: int = 8, seq: int | None = None, seed: int = 0,
         dtype: torch.dtype = torch.float32) -> ZooModel:
    """``GPT2LMHeadModel`` (causal LM; tied input/output embeddings) on random tokens."""
    dims = {"tiny": dict(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2),
            "small": dict(vocab_size=8192, n_positions=128, n_embd=320, n_layer=6, n_head=5),
            "base": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)}[size]
    seq = seq or {"tiny": 6, "small": 64, "base": 64}[size]
    cfg = _quiet(transformers.GPT2Config, **dims, bos_token_id=0, eos_token_id=0, use_cache=False)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, dims["vocab_size"], (examples, seq), generator=g)
    return ZooModel(f"GPT-2 ({size})", model, {"input_ids": ids}, causal_lm_loss)


def bert(size: Size = "tiny", *, examples: int = 8, seq: int | None = None, seed: int = 0,
         num_labels: int = 3, dtype: torch.dtype = torch.float32) -> ZooModel:
    """``BertForSequenceClassification`` (encoder, pooled [CLS] head) with an attention mask."""
    dims = {"tiny": dict(vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=8),
            "small": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=1024, max_position_embeddings=128),
            "base": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=512)}[size]
    seq = seq or {"tiny": 6, "small": 64, "base": 64}[size]
    cfg = _quiet(transformers.BertConfig, **dims, num_labels=num_labels, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, dims["vocab_size"], (examples, seq), generator=g)
    mask = torch.ones(examples, seq, dtype=torch.long)
    mask[: examples // 2, seq - 2:] = 0  # padding at the end of half of the examples
    labels = torch.randint(0, num_labels, (examples,), generator=g)
    return ZooModel(f"BERT ({size})", model, {"input_ids": ids, "attention_mask": mask, "labels": labels},
                    classification_loss)


def resnet18(size: Size = "tiny", *, examples: int = 8, image: int | None = None, seed: int = 0,
             num_labels: int = 10, dtype: torch.dtype = torch.float32) -> ZooModel:
    """``ResNetForImageClassification`` with BatchNorm (``"base"``: ResNet-18's widths 64-512 and
    depths 2-2-2-2, basic blocks, 11.2M parameters at 10 classes, 11.7M with ImageNet's 1,000)."""
    dims = {"tiny": dict(embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1]),
            "small": dict(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2]),
            "base": dict(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2])}[size]
    image = image or {"tiny": 8, "small": 32, "base": 32}[size]
    cfg = _quiet(transformers.ResNetConfig, num_channels=3, layer_type="basic", num_labels=num_labels, **dims)
    torch.manual_seed(seed)
    model = transformers.ResNetForImageClassification(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randn(examples, 3, image, image, generator=g, dtype=dtype)
    labels = torch.randint(0, num_labels, (examples,), generator=g)
    return ZooModel(f"ResNet-18 ({size})", model, {"pixel_values": pixels, "labels": labels},
                    classification_loss)


ZOO = {"gpt2": gpt2, "bert": bert, "resnet18": resnet18}
