"""The Lightning and HF Trainer adapters of lmech.stopping, with the real packages."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lmech.stopping import TrainLossPatience, gradient_signals

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")


def test_lightning_callback_stops_fit_when_the_criterion_fires(tmp_path):
    L = pytest.importorskip("lightning")
    from lmech.integrations.stopping_lightning import StoppingCallback

    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    y = x.sum(1, keepdim=True)

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, v):
            return self.lin(v)

        def training_step(self, batch, idx):
            loss = nn.functional.mse_loss(self(batch[0]), batch[1])
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-4)     # slow: the loss barely moves

    seen = []

    def signals(trainer, module):
        s = gradient_signals(module, nn.functional.mse_loss, x, y)
        seen.append(s["gate_fraction"])
        return {"gate_fraction": s["gate_fraction"]}

    cb = StoppingCallback(TrainLossPatience(patience=3, min_delta=0.05), every=2, signals=signals)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)   # full batch: the loss is monotone
    trainer = L.Trainer(max_steps=200, callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        accelerator="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Net(), loader)
    assert cb.criterion.should_stop and cb.criterion.stop_step == 8     # updates at 2, 4, 6, 8
    assert trainer.global_step == 8 and len(seen) == 4


def test_hf_trainer_callback_stops_training_when_the_criterion_fires(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from lmech.integrations.stopping_hf import StoppingCallback

    class Reg(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x, labels=None):
            out = self.lin(x)
            return {"loss": nn.functional.mse_loss(out, labels), "logits": out}

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x = torch.randn(64, 3, generator=g)

        def __len__(self):
            return 64

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.x[i].sum(0, keepdim=True)}

    cb = StoppingCallback(TrainLossPatience(patience=2, min_delta=0.9))   # nothing improves by 90%
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=50, per_device_train_batch_size=8, learning_rate=1e-4,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    torch.manual_seed(0)
    trainer = transformers.Trainer(model=Reg(), args=args, train_dataset=Data(), callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert cb.criterion.should_stop and cb.criterion.stop_step == 3 and trainer.state.global_step == 3
