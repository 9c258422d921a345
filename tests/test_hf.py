"""lmech.integrations.hf: the TrainerCallback on a tiny GPT-2 built locally (no download)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from lmech.integrations.hf import MonitorCallback, OutputOf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")
VOCAB, SEQ = 12, 6


class Tokens(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def lm_loss(logits, ids):  # next-token cross-entropy, as GPT-2 computes it internally
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def train(tmp_path, callbacks):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=8, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, VOCAB, (32, SEQ), generator=torch.Generator().manual_seed(1))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(ids), callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, model, ids


def test_trainer_callback_measures_without_changing_training(tmp_path):
    base, _, ids = train(tmp_path, [])
    cb = MonitorCallback(lm_loss, (ids[:8], ids[:8]), probes="economy", every=2)
    losses, model, _ = train(tmp_path, [cb])
    assert losses == base and len(base) == 4
    assert [s for s, _ in cb.monitor.history.records] == [0, 2, 4]
    last = cb.monitor.history.records[-1][1]
    assert {"probe/loss", "sharpness/lambda_1", "gradnoise/noise_scale"} <= set(last)
    # the probe loss is the model's own language-modelling loss on the probe batch
    model.eval()
    with torch.no_grad():
        own = model(ids[:8], labels=ids[:8]).loss
    assert last["probe/loss"] == pytest.approx(float(own), rel=1e-5)


def test_output_of_wrapper_shares_parameters():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=8, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    wrapped = OutputOf(model)
    assert all(a is b for a, b in zip(wrapped.parameters(), model.parameters()))
    ids = torch.randint(0, VOCAB, (2, SEQ))
    assert torch.equal(wrapped(ids), model(ids).logits)


def test_trainer_callback_forwards_to_trainer_log_with_a_dict_batch(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=8, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, VOCAB, (32, SEQ), generator=torch.Generator().manual_seed(1))
    # the probe batch as a data collator builds it; loss_fn gets the dict as its targets
    probe = {"input_ids": ids[:8], "attention_mask": torch.ones(8, SEQ, dtype=torch.long)}
    cb = MonitorCallback(lambda logits, b: lm_loss(logits, b["input_ids"]), probe, every=2)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(ids))
    assert cb.attach(trainer) is cb and cb in trainer.callback_handler.callbacks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    logged = [h for h in trainer.state.log_history if "sharpness/lambda_1" in h]
    assert [h["step"] for h in logged] == [0, 2, 4]  # the trainer's global step
    for h, (step, metrics) in zip(logged, cb.monitor.history.records):
        assert h["probe/loss"] == metrics["probe/loss"]
    model.eval()
    with torch.no_grad():
        own = model(ids[:8], labels=ids[:8]).loss
    assert logged[-1]["probe/loss"] == pytest.approx(float(own), rel=1e-5)
    # parameter names are the model's own (no wrapper prefix)
    assert any(k.startswith("gradnoise/snr/transformer.") for k in logged[-1])
