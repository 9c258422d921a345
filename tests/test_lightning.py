"""lmech.integrations.lightning: the callback measures on schedule and changes nothing."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from lmech.integrations.lightning import MonitorCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 3))
        self.losses: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def fit(tmp_path, callbacks):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    torch.manual_seed(0)
    model = Tiny()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)  # shuffles with the global RNG
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader)
    return model, (x[:32], y[:32])


def test_callback_measures_on_schedule_without_changing_training(tmp_path):
    base, probe_batch = fit(tmp_path, [])
    cb = MonitorCallback(F.cross_entropy, probe_batch, probes="economy", every=2)
    model, _ = fit(tmp_path, [cb])
    assert model.losses == base.losses and len(base.losses) == 6
    steps = [s for s, _ in cb.monitor.history.records]
    assert steps == [0, 2, 4, 6]
    last = cb.monitor.history.records[-1][1]
    assert {"sharpness/lambda_1", "gradnoise/snr", "probe/loss"} <= set(last)
    full = MonitorCallback(F.cross_entropy, probe_batch, probes="full", every=3)
    fit(tmp_path, [full])
    assert [s for s, _ in full.monitor.history.records] == [0, 3, 6]


class Recording(pl.loggers.Logger):
    """A Lightning logger that keeps what it is given."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def test_callback_forwards_scalars_to_the_trainer_logger(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    logger = Recording()
    # a dict probe batch: model(**batch), loss_fn(output, batch)
    cb = MonitorCallback(lambda out, b: F.cross_entropy(out, b["y"]), {"x": x[:32], "y": y[:32]},
                         probes="economy", every=2)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                         default_root_dir=str(tmp_path), callbacks=[cb])

    class Keyword(Tiny):
        def forward(self, x, y=None):
            return self.net(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Keyword(), DataLoader(TensorDataset(x, y), batch_size=16))
    ours = [(s, m) for s, m in logger.rows if "sharpness/lambda_1" in m]
    assert [s for s, _ in ours] == [0, 2, 4]  # at the trainer's global step
    for (step, row), (mstep, metrics) in zip(ours, cb.monitor.history.records):
        assert step == mstep
        assert row["probe/loss"] == metrics["probe/loss"]
        assert all(isinstance(v, float) for v in row.values())  # scalars only
    off = MonitorCallback(F.cross_entropy, (x[:32], y[:32]), every=2, log_to_trainer=False)
    logger2 = Recording()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(max_steps=2, accelerator="cpu", logger=logger2, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                   callbacks=[off]).fit(Tiny(), DataLoader(TensorDataset(x, y), batch_size=16))
    assert not any("sharpness/lambda_1" in m for _, m in logger2.rows)
