"""The lab's endpoints through Flask's test client (no browser): listing, curves, figures, sweeps,
the playground (validation and a real background run), confinement to the run store."""

from __future__ import annotations

import json
import sys
import time

import pytest

pytest.importorskip("flask", reason="the lab extra is not installed (pip install 'lmech[lab]')")

from report_store import shared_store  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from lmech.cli import app as cli_app  # noqa: E402
from lmech.lab import LabUnavailable, create_app, require_flask  # noqa: E402
from lmech.lab.playground import Launcher, form_fields, validate_form  # noqa: E402
from lmech.runs import RunStore  # noqa: E402
from lmech.sweeps import summary  # noqa: E402

SECRET = "TOP-SECRET-OUTSIDE-THE-STORE"


@pytest.fixture(scope="module")
def shared():
    return shared_store()


@pytest.fixture(scope="module")
def client(shared):
    return create_app(shared.root).test_client()


def strict_json(response):
    """The body parsed as strict JSON (NaN or Infinity would not parse in a browser)."""
    def refuse(token):
        raise AssertionError(f"non-JSON constant {token} in {response.request.path}")
    return json.loads(response.data, parse_constant=refuse)


def test_page_and_static_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and b"lmech lab" in page.data and b"/static/lab.js" in page.data
    for path in ("/static/lab.js", "/static/lab.css", "/static/vendor/uPlot.iife.min.js"):
        assert client.get(path).status_code == 200, path
    info = strict_json(client.get("/api/info"))
    assert info["playground"] == ["label-noise", "grokking"] and info["poll_ms"] > 0


def test_runs_are_listed_newest_first_with_states(client, shared):
    runs = strict_json(client.get("/api/runs"))["runs"]
    ids = [r["id"] for r in runs]
    assert set(ids) == {shared.run_id, *shared.sweep_runs}
    assert ids == list(RunStore(shared.root).runs()["id"])[::-1]
    assert all(r["state"] == "done" for r in runs)
    one = next(r for r in runs if r["id"] == shared.run_id)
    assert one["params"]["op"] == "+" and one["params"]["width"] == 16
    in_sweep = strict_json(client.get(f"/api/runs?sweep={shared.sweep}"))["runs"]
    assert sorted(r["id"] for r in in_sweep) == sorted(shared.sweep_runs)
    bad = client.get("/api/runs?sweep=nosuch")
    assert bad.status_code == 404 and "no sweep 'nosuch'" in bad.get_json()["error"]


def test_run_detail_matches_the_store(client, shared):
    store = RunStore(shared.root)
    detail = strict_json(client.get(f"/api/runs/{shared.run_id}"))
    assert detail["config"] == store.config(shared.run_id)["config"] and detail["state"] == "done"
    assert detail["checks"][0]["quantity"] == "final held-out accuracy" and detail["checks"][0]["passed"] is False
    assert detail["result"]["steps_run"] == 60 and "checks" not in detail["result"]
    assert detail["figures"] == ["grokking.png"]
    png = client.get(f"/api/runs/{shared.run_id}/figures/grokking.png")
    assert png.status_code == 200 and png.mimetype == "image/png"
    assert png.data == (shared.root / shared.run_id / "figures" / "grokking.png").read_bytes()
    missing = client.get(f"/api/runs/{shared.run_id}/figures/nope.png")
    assert missing.status_code == 404 and "has no figure 'nope.png'" in missing.get_json()["error"]


def test_metrics_are_the_store_metrics_with_errors_for_accuracies(client, shared):
    body = strict_json(client.get(f"/api/runs/{shared.run_id}/metrics"))
    wide = RunStore(shared.root).metrics(shared.run_id, wide=True)
    assert body["step"] == wide["step"].tolist() == list(range(0, 61, 10))
    assert body["series"]["test_error"] == pytest.approx((1 - wide["test_acc"]).tolist())
    assert body["series"]["train_loss"] == pytest.approx(wide["train_loss"].tolist())
    assert "test_acc" not in body["series"]
    titles = [p["title"] for p in body["panels"]]
    assert titles[:2] == ["error", "loss"] and {"lr", "weight"} <= set(titles)


def test_sweeps_are_listed_with_their_tables(client, shared):
    sweeps = strict_json(client.get("/api/sweeps"))["sweeps"]
    assert sweeps == [{"name": shared.sweep, "experiment": "grokking", "runs": 4, "grid_keys": ["lr"],
                       "states": {"done": 4}}]
    table = strict_json(client.get(f"/api/sweeps/{shared.sweep}"))
    expected = summary(shared.sweep, out=shared.root)
    assert [r["run_id"] for r in table["rows"]] == expected["run_id"].tolist()
    assert [r["lr"] for r in table["rows"]] == expected["lr"].tolist()


def test_reports_are_served_from_memory(client, shared):
    before = sorted(p.relative_to(shared.root) for p in shared.root.rglob("*"))
    page = client.get(f"/runs/{shared.run_id}/report")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert b"data:image/png;base64," in page.data and b"final held-out accuracy" in page.data
    sweep_page = client.get(f"/sweeps/{shared.sweep}/report")
    assert sweep_page.status_code == 200 and b"data:image/png;base64," in sweep_page.data
    assert sorted(p.relative_to(shared.root) for p in shared.root.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("path", ["/api/runs/{}", "/api/runs/{}/metrics", "/api/runs/{}/figures/grokking.png",
                                  "/runs/{}/report"])
def test_unknown_run_is_a_clear_404(client, path):
    response = client.get(path.format("grokking-nosuch"))
    assert response.status_code == 404
    assert "no run 'grokking-nosuch'" in response.get_json()["error"]


def test_a_run_id_prefix_is_not_resolved(client, shared):
    """RunStore.resolve accepts unique prefixes and paths; the lab accepts exact run names only."""
    response = client.get(f"/api/runs/{shared.run_id[:-3]}")
    assert response.status_code == 404


@pytest.fixture(scope="module")
def outside(shared):
    """A secret file and a run-shaped folder next to (outside) the store."""
    base = shared.root.parent
    (base / "secret.txt").write_text(SECRET)
    (base / "fake").mkdir(exist_ok=True)
    (base / "fake" / "config.json").write_text(json.dumps({"id": "fake", "secret": SECRET}))
    (base / "fake" / "figures").mkdir(exist_ok=True)
    (base / "fake" / "figures" / "x.png").write_text(SECRET)
    return base


TRAVERSALS = [
    "/api/runs/../secret.txt", "/api/runs/..%2Fsecret.txt", "/api/runs/..%2ffake", "/api/runs/%2e%2e%2ffake",
    "/api/runs/%2e%2e/fake", "/api/runs/%252e%252e%252ffake", "/api/runs/..", "/api/runs/.", "/api/runs/%2e%2e",
    "/api/runs/..%5cfake", "/api/runs/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/api/runs/%2Fetc%2Fpasswd",
    "/api/runs/..%2ffake/metrics", "/api/runs/%2e%2e%2ffake/figures/x.png", "/api/runs/{run}/figures/..%2f..%2fconfig.json",
    "/api/runs/{run}/figures/%2e%2e%2fconfig.json", "/api/runs/{run}/figures/..", "/api/runs/sweeps",
    "/api/runs/index.sqlite", "/api/runs/*", "/api/sweeps/..%2f..%2fsecret", "/api/sweeps/%2e%2e",
    "/runs/..%2ffake/report", "/sweeps/..%2f..%2fsecret/report", "/static/../../etc/passwd",
    "/static/..%2f..%2f..%2fetc%2fpasswd", "/static/%2e%2e/app.py", "/static/%2e%2e%2f%2e%2e%2fsecret.txt",
    "/static/..%5c..%5capp.py", "/static//etc/passwd", "/api/playground/..%2f..%2fsecret",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_paths_cannot_escape_the_store(client, shared, outside, path):
    response = client.get(path.format(run=shared.run_id), follow_redirects=True)  # '//' redirects to '/'
    assert response.status_code in (400, 404), (path, response.status_code)
    assert SECRET.encode() not in response.data and b"root:" not in response.data
    assert b'"config_hash"' not in response.data and b"def create_app" not in response.data


def test_playground_form_comes_from_the_quick_config():
    fields = {f["key"]: f for f in form_fields("label-noise")}
    assert list(fields) == ["task", "noise", "optimizer", "batch_size", "lr", "weight_decay", "width", "steps"]
    assert fields["task"]["choices"][0] == "digits" and fields["noise"]["kind"] == "float"
    assert fields["width"]["default"] == 64  # the quick configuration, not the full one (128)
    fields = {f["key"]: f for f in form_fields("grokking")}
    assert list(fields) == ["op", "train_fraction", "optimizer", "batch_size", "lr", "weight_decay", "width", "steps"]
    assert fields["op"]["kind"] == "choice" and fields["op"]["choices"] == ["+", "-", "*", "/"]
    assert fields["op"]["default"] == "+" and fields["steps"]["default"] == 20_000  # the quick configuration
    assert fields["lr"]["kind"] == "float" and fields["steps"]["kind"] == "int"
    assert validate_form("grokking", {"steps": "25", "optimizer": "sgd", "lr": ""}, "3") == (
        {"steps": 25, "optimizer": "sgd", "lr": 1e-3}, 3)


@pytest.mark.parametrize("body, message", [
    ({"experiment": "nosuch", "values": {}}, "unknown playground experiment 'nosuch'"),
    ({"experiment": "grokking", "values": {"out": "/etc"}}, "unknown field(s) 'out'"),
    ({"experiment": "grokking", "values": {"lr": "fast"}}, "bad value for lr: 'fast' is not a number"),
    ({"experiment": "grokking", "values": {"lr": "-1"}}, "lr must be positive"),
    ({"experiment": "grokking", "values": {"optimizer": "lion"}}, "is not one of adamw, adam, sgd"),
    ({"experiment": "grokking", "values": {"steps": "2.5"}}, "bad value for steps"),
    ({"experiment": "grokking", "values": {"train_fraction": "1.5"}}, "train_fraction must be in (0, 1)"),
    ({"experiment": "grokking", "values": {"lr": ["1"]}}, "bad value for lr"),
    ({"experiment": "label-noise", "values": {"noise": "0.7"}}, "noise (flip fraction q) must be in [0, 0.5)"),
    ({"experiment": "label-noise", "values": {"task": "cifar"}}, "is not one of digits, mnist1d, teacher"),
    ({"experiment": "label-noise", "values": {"optimizer": "sgd"}}, "optimizer=sgd needs 0 < batch_size < n_train"),
    ({"experiment": "grokking", "values": "lr=1"}, "form values must be an object"),
    ({"experiment": "grokking", "values": {}, "seed": -1}, "bad seed -1"),
    ({"experiment": "grokking", "values": {}, "seed": "x"}, "bad seed 'x'"),
    ([1, 2], "send a JSON object"),
])
def test_bad_playground_input_is_refused_and_starts_nothing(tmp_path, body, message):
    lab_app = create_app(tmp_path / "runs")
    response = lab_app.test_client().post("/api/playground", json=body)
    assert response.status_code == 400
    assert message in response.get_json()["error"]
    assert not (tmp_path / "runs").exists()


def test_playground_needs_a_json_body(tmp_path):
    """A form post (which a page on another site could send) is refused."""
    client = create_app(tmp_path / "runs").test_client()
    response = client.post("/api/playground", data={"experiment": "grokking"})
    assert response.status_code == 400 and "as JSON" in response.get_json()["error"]
    assert client.get("/api/playground").status_code == 405


def test_a_playground_run_goes_from_the_form_to_done(tmp_path):
    root = tmp_path / "runs"
    lab_app = create_app(root, max_active=1)
    client = lab_app.test_client()
    values = {"task": "digits", "noise": "0.3", "optimizer": "gd", "steps": "40", "width": "32"}
    started = client.post("/api/playground", json={"experiment": "label-noise", "values": values, "seed": 2})
    assert started.status_code == 201, started.get_json()
    run_id = started.get_json()["id"]
    busy = client.post("/api/playground", json={"experiment": "label-noise", "values": values})
    assert busy.status_code == 409 and "wait for it to finish" in busy.get_json()["error"]
    states = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        state = client.get(f"/api/runs/{run_id}").get_json()["state"]
        states.append(state)
        if state not in ("starting", "running"):
            break
        time.sleep(0.5)
    lab_app.extensions["lmech_lab"].launcher.wait(timeout=60)
    assert states[-1] == "done", (states[-1], (root / ".lab" / f"{run_id}.log").read_text())
    assert set(states) <= {"starting", "running", "done"}
    config = RunStore(root).config(run_id)
    assert config["seed"] == 2 and config["config"]["noise"] == 0.3 and config["config"]["width"] == 32
    assert config["config"]["n_train"] == 128  # the quick configuration underneath the form
    metrics = strict_json(client.get(f"/api/runs/{run_id}/metrics"))
    wide = RunStore(root).metrics(run_id, wide=True)
    assert metrics["step"] == wide["step"].tolist() and metrics["step"][-1] == 40
    sent = [float("nan") if v is None else v for v in metrics["series"]["noise_reservoir"]]  # NaN is sent as null
    assert sent == pytest.approx(wide["noise_reservoir"].tolist(), nan_ok=True)
    panels = {p["title"]: p["series"] for p in metrics["panels"] if p["main"]}
    assert {"train_error", "test_error"} <= set(panels["error"])
    assert set(panels["signal channel / reservoir"]) == {"signal_channel", "signal_reservoir", "noise_channel",
                                                          "noise_reservoir"}
    assert run_id in [r["id"] for r in client.get("/api/runs").get_json()["runs"]]


def test_a_worker_that_dies_before_its_run_exists_reads_failed(tmp_path):
    launcher = Launcher(tmp_path / "runs", python="/bin/false")  # exits 1 at once, like a broken interpreter
    run_id = launcher.start("grokking", {"steps": 5}, 0)
    launcher.wait(timeout=30)
    state = launcher.state(run_id)
    assert state["state"] == "failed" and "exited with code 1" in state["message"]
    assert launcher.active() == []


def test_other_hosts_are_refused_on_loopback(tmp_path):
    client = create_app(tmp_path, host="127.0.0.1").test_client()
    assert client.get("/api/info").status_code == 200
    assert client.get("/api/info", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    assert client.get("/api/info", headers={"Host": "attacker.example:8000"}).status_code == 400


def test_missing_flask_is_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "flask", None)
    with pytest.raises(LabUnavailable, match=r'pip install "lmech\[lab\]"'):
        require_flask()
    result = CliRunner().invoke(cli_app, ["lab", "--port", "0"])
    assert result.exit_code == 2
    result = CliRunner().invoke(cli_app, ["lab"])
    assert result.exit_code == 2 and "lmech lab needs Flask" in result.output
