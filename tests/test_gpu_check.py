"""benchmarks/gpu_check.py in its CPU mode (``--device cpu --tiny``): the script a GPU machine runs
must not rot where no GPU is lent. Checks the table's sections and that no row failed."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_in_tiny_mode():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT / "src")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--threads", "1"], capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    lines = out.splitlines()
    assert lines[0].startswith("lmech gpu_check: torch") and "device cpu" in lines[0]
    body = [line.split()[0] for line in lines[3:] if line.strip()]
    assert {"agreement", "sync", "monitor", "optimizer", "ddp"} <= set(body)
    for probe in ("sharpness", "ntk", "gradnoise", "weights", "representations", "hessian_trace"):
        assert any(f"transformer: {probe}" in line and line.rstrip().endswith("ok") for line in lines), probe
    assert any("PathRecorder" in line and line.rstrip().endswith("ok") for line in lines)
    assert any("overhead at every=100" in line for line in lines)
    assert any("PopRiskAdamW default (foreach)" in line for line in lines)
    assert "ERROR" not in out and "FAIL" not in out
