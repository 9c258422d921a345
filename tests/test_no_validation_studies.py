"""The pruning and noisy-DPO studies: scripts' --quick configurations and the catalog entries' check rows."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from lmech.errors import ConfigError
from lmech.experiments import get, run_experiment

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY_PRUNE = ["mlp_width=16", "mlp_steps=60", "cnn_channels=4", "cnn_steps=60", "n_train=200", "batch_size=50"]
TINY_DPO = ["sft_steps=40", "n_pairs=64", "n_heldout=64", "n_eval=128", "steps=20", "batch_size=32", "d_model=8"]


def test_prune_study_script_writes_table_and_figure(tmp_path):
    out = _script("prune_study").main(["--quick", "--out", str(tmp_path), *sum((["--set", s] for s in TINY_PRUNE), [])])
    assert (tmp_path / "table.md").read_text().count("| reservoir |") == 2
    assert (tmp_path / "prune_study.png").stat().st_size > 0
    r = out["results"][0]["mlp-digits"]
    assert set(r["acc"]) == {f"{m}@{s}" for m in ("reservoir", "reservoir_grad", "magnitude", "displacement", "random")
                             for s in ("0.5", "0.8")}
    assert r["n_dead_inputs"] > 0 and r["dead_input_usage_max"] == 0.0     # constant pixels: exactly in the reservoir


def test_dpo_study_script_selects_one_lr_per_arm_and_noise(tmp_path):
    out = _script("dpo_study").main(["--quick", "--out", str(tmp_path), "--set", "lrs=1e-3,3e-3",
                                     *sum((["--set", s] for s in TINY_DPO), [])])
    rows = out["rows"]
    assert len(rows) == 2 * 2 * 2                                           # noises x arms x lrs, one seed
    for q in (0.0, 0.3):
        for arm in ("adamw", "poprisk"):
            g = [r for r in rows if r["noise"] == q and r["arm"] == arm]
            best = max(r["heldout_pref_acc"] for r in g)
            assert sum(r["selected"] for r in g) == 1
            assert next(r for r in g if r["selected"])["heldout_pref_acc"] == best
    assert all(abs(r["first_loss"] - math.log(2)) < 1e-5 for r in rows)     # the policy starts as the reference
    assert all(0 <= r["win_rate"] <= 1 for r in rows)
    assert "win rate vs reference" in (tmp_path / "table.md").read_text()


def test_swapping_is_exact_and_pairs_prefer_the_higher_true_reward():
    from lmech.experiments import dpo_noisy as d

    cfg = get("dpo-noisy").make_config(TINY_DPO, quick=True)
    torch.manual_seed(0)
    ref = d.build_policy(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    p = d.make_pairs(ref, 50, cfg, gen)
    assert torch.all(d.true_reward(p.x, p.chosen, cfg) > d.true_reward(p.x, p.rejected, cfg))
    torch.testing.assert_close(p.ref_chosen, d.response_logprob(ref, p.x, p.chosen))
    noisy = p.noisy(0.3, gen)
    assert int(noisy.swapped.sum()) == 15
    worse = d.true_reward(p.x, noisy.chosen, cfg) < d.true_reward(p.x, noisy.rejected, cfg)
    assert torch.equal(worse, noisy.swapped)
    torch.testing.assert_close(noisy.ref_chosen, d.response_logprob(ref, p.x, noisy.chosen))


@pytest.mark.parametrize("name,sets", [("prune-reservoir", TINY_PRUNE), ("dpo-noisy", TINY_DPO)])
def test_catalog_entries_return_their_check_rows(tmp_path, name, sets):
    summary = run_experiment(name, sets, seed=0, out=tmp_path, quick=True)
    assert summary["state"] == "done"
    rows = summary["checks"]
    assert len(rows) == (5 if name == "prune-reservoir" else 4)
    assert rows[0].passed                                       # the exact row: zero usage / log 2 at the reference


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="tasks"):
        get("prune-reservoir").make_config(["tasks=resnet"])
    with pytest.raises(ConfigError, match="noises"):
        get("dpo-noisy").make_config(["noises=0.6"])
    with pytest.raises(ConfigError, match="arms"):
        get("dpo-noisy").make_config(["arms=sgd"])


def test_prune_reservoir_probes_economy_per_task_changes_no_measurement(tmp_path):
    from probes_parity import assert_probes_leave_training_unchanged

    tiny = {"tasks": "mlp-digits", "mlp_width": 16, "mlp_steps": 30, "sparsities": "0.5,0.8"}
    _, probed = assert_probes_leave_training_unchanged("prune-reservoir", tiny, tmp_path, "probe/loss")
    assert probed.dropna(subset=["mlp-digits/probe/loss"])["step"].tolist() == [3 * k for k in range(1, 11)]
