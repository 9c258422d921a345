"""Run the README's main job and write its real output into README.md (and its figure into docs/results).

    python scripts/readme_expected_output.py

Runs ``lmech run grokking --set model=mlp --set op=+ --set train_fraction=0.4`` in a fresh store,
drops the progress lines and the wall time (they depend on the machine's load), writes the run id as
``grokking-<time>-<hash>`` and the store as ``runs``, and replaces the block between the
``expected-output`` markers. The figure becomes docs/results/grokking-mlp.png.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ["run", "grokking", "--set", "model=mlp", "--set", "op=+", "--set", "train_fraction=0.4"]
START, END = "<!-- expected-output:start -->", "<!-- expected-output:end -->"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "runs"
        proc = subprocess.run([sys.executable, "-m", "lmech.cli", *COMMAND, "--out", str(store)],
                              capture_output=True, text=True, cwd=tmp)
        if proc.returncode != 0:
            sys.exit(f"the README's main job exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        (run_dir,) = [p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")]
        shutil.copy(run_dir / "figures" / "grokking.png", ROOT / "docs" / "results" / "grokking-mlp.png")
        lines = [line for line in proc.stdout.splitlines() if not re.match(r"^grokking: step \d+", line)]
        text = "\n".join(lines).replace(str(store), "runs").replace(run_dir.name, "grokking-<time>-<hash>")
        text = re.sub(r'"wall_time_s": [0-9.]+', '"wall_time_s": <seconds>', text)  # the machine's, not the code's
    readme = (ROOT / "README.md").read_text()
    head, rest = readme.split(START)
    _, tail = rest.split(END)
    (ROOT / "README.md").write_text(f"{head}{START}\n```\n{text.strip()}\n```\n{END}{tail}")
    print(text)


if __name__ == "__main__":
    main()
