"""Checkpoints: an interrupted grokking run continues from its last checkpoint and logs exactly what
an uninterrupted run logs (in-process interruption, and a sweep killed with SIGKILL)."""

import json
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from lmech.experiments import run_experiment
from lmech.runs import RunStore
from lmech.sweeps import run_sweep
from lmech.train import minibatches

# a grokking run of about a second that checkpoints every 50 steps
SMALL = {"model": "mlp", "p": 11, "op": "+", "train_fraction": 0.5, "steps": 300, "eval_every": 10, "width": 16,
         "batch_size": 16, "checkpoint_every": 50, "patience": 10_000}
ARMS = {"adamw": {}, "poprisk-snr": {"optimizer": "poprisk", "gate": "snr", "alpha": "finite"},
        "grokfast": {"optimizer": "grokfast"}}


def test_minibatches_state_round_trip_continues_the_same_sequence():
    straight = minibatches(10, 3, torch.Generator().manual_seed(1))
    expected = [next(straight) for _ in range(12)]
    first = minibatches(10, 3, torch.Generator().manual_seed(1))
    got = [next(first) for _ in range(5)]
    state = first.state_dict()
    second = minibatches(10, 3, torch.Generator().manual_seed(99))  # another seed: the state decides
    second.load_state_dict(state)
    got += [next(second) for _ in range(7)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


class Interrupt(KeyboardInterrupt):
    pass


def _interrupt_after(step: int):
    def on_start(run, cfg):
        def stop(logged_step, values):
            if logged_step >= step:
                raise Interrupt
        run.on_log.append(stop)
    return on_start


@pytest.mark.parametrize("arm", list(ARMS))
def test_interrupted_run_continues_from_its_checkpoint_with_identical_metrics(tmp_path, arm):
    sets = {**SMALL, **ARMS[arm]}
    straight = run_experiment("grokking", sets, seed=3, out=tmp_path, run_id="straight")
    with pytest.raises(Interrupt):  # stops after logging step 170: the last checkpoint is at step 150
        run_experiment("grokking", sets, seed=3, out=tmp_path, run_id="cut", on_start=_interrupt_after(170))
    store = RunStore(tmp_path)
    assert store.status("cut")["checkpoint_step"] == 150
    store.retire("cut")  # what a sweep does with an incomplete run
    resumed = run_experiment("grokking", sets, seed=3, out=tmp_path, run_id="cut")

    assert resumed["state"] == "done" and store.status("cut")["resumed_from"] == {"attempt": "1", "step": 150}
    a, b = store.metrics("straight"), store.metrics("cut")
    pd.testing.assert_frame_equal(a.sort_values(["step", "name"]).reset_index(drop=True),
                                  b.sort_values(["step", "name"]).reset_index(drop=True))
    assert b.groupby(["step", "name"]).size().max() == 1  # no step logged twice
    for key in ("step_to_95", "step_to_99", "final_test_acc", "steps_run"):
        assert resumed["result"][key] == straight["result"][key]
    assert not list(tmp_path.rglob("checkpoint.pt"))  # finished: the checkpoints are gone


def test_without_an_earlier_attempt_there_is_nothing_to_resume(tmp_path):
    run = RunStore(tmp_path).create("grokking", {"x": 1}, seed=0, run_id="fresh")
    with run:
        assert run.resume() is None


KILLED = """
import sys, torch
torch.set_num_threads(1)
from lmech.sweeps import run_sweep
run_sweep("grokking", sets={sets!r}, seeds=[0], workers=1, out=sys.argv[1], progress=False)
"""


def test_sweep_killed_with_sigkill_continues_the_run_from_its_checkpoint(tmp_path):
    sets = {**SMALL, "steps": 2000, "checkpoint_every": 200}
    script = tmp_path / "sweep.py"
    script.write_text(KILLED.format(sets=sets))
    root = tmp_path / "store"
    _kill_after_first_checkpoint([sys.executable, str(script), str(root)], root)
    time.sleep(0.5)  # the run process exits with its driver

    df = run_sweep("grokking", sets=sets, seeds=[0], workers=1, out=root, progress=False)
    run_id = df["run_id"][0]
    store = RunStore(root)
    status = store.status(run_id)
    assert df["state"][0] == "done" and status["resumed_from"]["step"] >= 200
    _assert_same_as_uninterrupted(sets, store, run_id, tmp_path)


def test_lmech_run_takes_up_an_incomplete_run_and_says_so(tmp_path):
    """A `lmech run` killed with SIGKILL, then the same command again: it continues that run from its
    checkpoint (same id, one run in the store) and ends with the uninterrupted run's metrics."""
    sets = {**SMALL, "steps": 2000, "checkpoint_every": 200}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    root = tmp_path / "store"
    _kill_after_first_checkpoint([sys.executable, "-m", "lmech.cli", "run", "grokking", *args, "--out", str(root)], root)
    (killed,) = RunStore(root).runs()["id"]
    again = subprocess.run([sys.executable, "-m", "lmech.cli", "run", "grokking", *args, "--out", str(root)],
                           capture_output=True, text=True, timeout=300)
    assert f"found incomplete run {killed} with this config and seed: continuing it from its checkpoint" in " ".join(
        again.stdout.split())
    store = RunStore(root)
    assert store.runs()["id"].tolist() == [killed] and store.status(killed)["state"] == "done"
    _assert_same_as_uninterrupted(sets, store, killed, tmp_path)


def test_an_incomplete_run_without_checkpoint_is_replaced_under_its_id(tmp_path):
    sets = {**SMALL, "checkpoint_every": 0}
    with pytest.raises(Interrupt):
        run_experiment("grokking", sets, seed=3, out=tmp_path, on_start=_interrupt_after(20))
    store = RunStore(tmp_path)
    (cut,) = store.runs()["id"]
    # same process: the writer is alive, so it reads running; mark it as a dead writer would leave it
    status = store.status(cut)
    status["pid"] = 2**22 + 12345  # no such process
    (tmp_path / cut / "status.json").write_text(json.dumps(status))
    summary = run_experiment("grokking", sets, seed=3, out=tmp_path)
    assert summary["id"] == cut and summary["taken_up"] == {"id": cut, "step": None}
    assert store.runs()["state"].tolist() == ["done"]
    assert (tmp_path / ".attempts" / cut / "1" / "config.json").exists()


def _kill_after_first_checkpoint(command: list[str], root) -> None:
    """Start ``command``, SIGKILL it as soon as a run folder under ``root`` holds a checkpoint."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(root.glob("grokking-*/checkpoint.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, "it ended or hung before a checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _assert_same_as_uninterrupted(sets: dict, store: RunStore, run_id: str, tmp_path) -> None:
    straight = run_experiment("grokking", sets, seed=0, out=tmp_path / "straight", run_id="straight")
    a = RunStore(tmp_path / "straight").metrics("straight").sort_values(["step", "name"]).reset_index(drop=True)
    b = store.metrics(run_id).sort_values(["step", "name"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert straight["result"]["final_test_acc"] == store.result(run_id)["final_test_acc"]
