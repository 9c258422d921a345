#!/usr/bin/env bash
# The paper's grokking setting, measured over seeds (issue: "Settle the paper's two headline claims").
# a / b mod 97, 25% train, 2-layer width-128 transformer, the paper's hyperparameters for every arm
# (lr 1e-3, weight decay 1, betas (0.9, 0.98), batch 512, 10-step warm-up), at most 60,000 steps.
# Resumable: run it again and it skips finished runs and continues interrupted ones from their
# last checkpoint (every 2,000 steps). Seed-major order, so a stopped sweep has even seeds per arm;
# within a seed the PopRisk arms first (they can stop early at 99% held-out accuracy, AdamW runs to
# the cap). The order does not change the runs' ids: reordering resumes the same sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
exec lmech sweep grokking --set steps=60000 \
  --point optimizer=poprisk,gate=soft,alpha=1 \
  --point optimizer=poprisk,gate=snr,alpha=finite \
  --point optimizer=poprisk,gate=snr,alpha=finite,gate_warmup=32 \
  --point optimizer=grokfast \
  --point optimizer=adamw \
  --seeds "${SEEDS:-5}" --order seeds --workers "${WORKERS:-2}" \
  --out results/grokking-paper --name grokking-paper "$@"
