"""Recompute the channel-noise signal of cached no-validation runs after the factor-2 fix of its
penalty (commit "channel-noise: full sigma^2 df / n optimism"), and rescore every rule.

The runs logged ``channel_noise_risk`` = Phi_S N / (N - df_W) (half the optimism); the corrected
value Phi_S (N + df_W) / (N - df_W) follows exactly from the logged training loss ``loss`` and
``channel_df`` (one output, N = n), so no run is repeated. Usage:

    PYTHONPATH=src python scripts/no_validation_rescore.py docs/results/no-validation
    PYTHONPATH=src python scripts/no_validation_study.py --out docs/results/no-validation   # tables again
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmech.experiments._no_validation import score_stopping


def main(out: str) -> None:
    for f in sorted(Path(out, "raw").glob("*.json")):
        r = json.loads(f.read_text())
        if r.get("channel_noise_fixed"):
            continue
        n = 256 if "_quick" not in f.name else 48
        for row in r["rows"]:
            row["channel_noise_risk"] = row["loss"] * (n + row["channel_df"]) / (n - row["channel_df"])
        r["stopping"] = score_stopping(r["rows"], n, 10 if "_quick" not in f.name else 3)
        r["channel_noise_fixed"] = True
        f.write_text(json.dumps(r))


if __name__ == "__main__":
    main(sys.argv[1])
