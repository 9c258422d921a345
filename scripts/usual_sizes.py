"""Every probe, once, on the zoo's models at their usual small sizes: works or refuses in one line.

GPT-2 124M (``GPT2Config()``'s dimensions), BERT-base 110M (``BertConfig()``'s) and ResNet-18
(11.2M at 10 classes, 11.7M with 1,000; ``transformers``' ``ResNetForImageClassification`` from a ResNet-18
``ResNetConfig``: torchvision has no CPU wheel for torch 2.13 on the package registry), random
init (:mod:`lmech.integrations.zoo`), one realistic batch each. For every probe the call a user
would make first (defaults); when it refuses for memory, the fix its message names, applied
(one more row). A refusal counts only if lmech raised it on purpose: an ``LmechError``, or an
exception raised in lmech's own code, whose message is one line; anything else (a traceback out of
torch or transformers) is a defect and is marked so.

    PYTHONPATH=src python scripts/usual_sizes.py                  # base sizes: hours on one thread
    PYTHONPATH=src python scripts/usual_sizes.py --models bert     # one model (run models side by side)
    PYTHONPATH=src python scripts/usual_sizes.py --size tiny --out /tmp/x.md

Writes docs/results/usual-sizes.md (``--out``); peak memory is the process's peak resident set
during the call (``VmHWM``, reset before each call; it includes the model itself).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import lmech
from lmech import Monitor
from lmech.errors import LmechError, MemoryBudgetError
from lmech.integrations import zoo
from lmech.probes import (PathRecorder, grad_noise, hessian_spectral_density, hessian_trace, layer_features,
                          linear_cka, ntk, sharpness, weight_spectra)

ROOT = Path(__file__).resolve().parents[1]
LMECH_DIR = str(Path(lmech.__file__).resolve().parent)
BUDGET = 2 * 1024**3  # the probes' default max_bytes (lmech.core.functional.DEFAULT_MAX_BYTES)


# --------------------------------------------------------------------------------------------
# One call, classified
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    probe: str
    call: str
    status: str  # "works", "refused" or "DEFECT"
    value: str
    seconds: float
    peak_mib: float | None
    error: BaseException | None = field(default=None, repr=False)
    headline: float | str | None = None  # the probe's main number (first value)


def _peak_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    except OSError:
        pass


def _peak_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def is_refusal(e: BaseException) -> bool:
    """Raised by lmech on purpose: an ``LmechError``, or raised in lmech's own code, one line."""
    message = str(e)
    if not message or "\n" in message.strip():
        return False
    if isinstance(e, LmechError):
        return True
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(LMECH_DIR)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def attempt(model: str, probe: str, call: str, fn: Callable[[], dict]) -> Row:
    """Run ``fn`` once; its dict of values, seconds and peak memory, or what it raised."""
    _peak_reset()
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = fn()
    except Exception as e:  # classified, not hidden: a non-refusal is reported as a defect
        seconds = time.perf_counter() - t0
        status = "refused" if is_refusal(e) else "DEFECT"
        text = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
        return Row(model, probe, call, status, text, seconds, _peak_mib(), e)
    seconds = time.perf_counter() - t0
    headline = next(iter(values.values()))  # the probe's main number must be finite
    finite = not isinstance(headline, float) or math.isfinite(headline)
    value = ", ".join(f"{k} {_fmt(v)}" for k, v in values.items())
    return Row(model, probe, call, "works" if finite else "DEFECT", value, seconds, _peak_mib(), None, headline)


# --------------------------------------------------------------------------------------------
# The probes, as a user calls them
# --------------------------------------------------------------------------------------------


def inputs_of(z: zoo.ZooModel) -> dict:
    return {k: v for k, v in z.batch.items() if k != "labels"}


def basis_vectors(z: zoo.ZooModel, budget: int = BUDGET) -> int:
    """How many parameter-sized vectors fit the budget (what a Lanczos basis may hold)."""
    itemsize = next(z.model.parameters()).element_size()
    return int(budget // (itemsize * z.num_params))


def probe_calls(z: zoo.ZooModel, train_mode: bool = False, budget: int = BUDGET
                ) -> list[tuple[str, str, Callable[[], dict], Callable | None]]:
    """``(probe, call, fn, fix)``: ``fix(error)`` gives ``(call, fn)`` to retry a memory refusal.
    ``budget``: every probe's ``max_bytes`` (the Monitor keeps its own ``budget_mb``)."""
    m, loss, batch, out = z.model, z.loss_fn, z.batch, z.output
    fit = max(basis_vectors(z, budget) - 1, 1)  # Lanczos/SLQ steps whose basis fits the budget

    def top(**kw):
        r = sharpness(m, loss, batch, output=out, max_bytes=budget, **kw)
        return {"lambda_1": float(r.eigenvalues[0]), "rel_error": float(r.relative_error_bound[0]),
                "hvps": r.num_hvps}

    def trace(**kw):
        r = hessian_trace(m, loss, batch, output=out, max_bytes=budget, **kw)
        return {"trace": r.value, "stderr": r.stderr}

    def density(**kw):
        r = hessian_spectral_density(m, loss, batch, output=out, max_bytes=budget, **kw)
        return {"nodes_max": float(r.nodes.max()), "trace": float(r.trace(lambda x: x))}

    def kernel(**kw):
        K = ntk(m, inputs_of(z), output=out, max_bytes=budget, **kw)
        return {"shape": "x".join(map(str, K.shape)), "trace": float(K.diagonal().sum())}

    def noise():
        g = grad_noise(m, loss, batch, output=out, max_bytes=budget)
        return {"snr": g.total.snr, "noise_scale": g.total.noise_scale, "method": g.method}

    def weights():
        s = weight_spectra(m)
        fitted = [v.alpha.alpha for v in s.values() if v.alpha is not None]
        return {"max_spectral_norm": max(v.spectral_norm for v in s.values()), "matrices": len(s),
                "alpha_mean": sum(fitted) / len(fitted) if fitted else math.nan}

    def representations():
        feats = layer_features(m, inputs_of(z))
        varying = [n for n, h in feats.items() if float(h.double().var(0).sum()) > 0]  # CKA needs variance
        first, last = varying[0], varying[-1]
        return {f"cka({first}, {last})": linear_cka(feats[first].double(), feats[last].double()),
                "layers": len(feats)}

    def gramian():
        xs = inputs_of(z)
        half = next(iter(xs.values())).shape[0] // 2
        rec = PathRecorder(m, {k: v[:half] for k, v in xs.items()}, batch["labels"][:half],
                           {k: v[half:] for k, v in xs.items()}, loss="cross_entropy", output=out,
                           max_bytes=budget)
        rec.start()
        s = rec.step(1e-3)  # one interval with the weights unchanged: the driving kernel K0 at init
        return {"K0_trace": float(rec.K0.diagonal().sum()), "poprisk_loo": s["poprisk_loo"]}

    def economy(budget_mb=512):
        mon = Monitor(m, loss, batch, probes="economy", output=out, budget_mb=budget_mb)
        r = mon.measure(0)
        return {k: r[k] for k in ("probe/loss", "gradnoise/snr", "weights/stable_rank_mean", "sharpness/lambda_1")}

    def basis_fix(make, what):
        def fix(e):
            if not isinstance(e, MemoryBudgetError):
                return None
            return f"{what}={fit}", lambda: make(**{what: fit})
        return fix

    rows = [
        ("sharpness top-1", "sharpness()", top, basis_fix(top, "max_iter")),
        ("Hessian trace", "hessian_trace() (Hutch++, 30 HVPs)", trace,
         lambda e: ("method='hutchinson', num_matvecs=4", lambda: trace(method="hutchinson", num_matvecs=4))
         if isinstance(e, MemoryBudgetError) else None),
        ("spectral density", "hessian_spectral_density(num_probes=1, num_steps=20)",
         lambda: density(num_probes=1, num_steps=20),
         lambda e: (f"num_probes=1, num_steps={fit}", lambda: density(num_probes=1, num_steps=fit))
         if isinstance(e, MemoryBudgetError) else None),
        ("NTK", "ntk(inputs)", kernel,
         lambda e: ("trace_outputs=True", lambda: kernel(trace_outputs=True))
         if isinstance(e, MemoryBudgetError) and "trace_outputs=True" in str(e) else None),
        ("gradient noise", "grad_noise()", noise, None),
        ("weights", "weight_spectra() (SVDs, power-law fits)", weights, None),
        ("representations", "layer_features() + linear_cka", representations, None),
    ]
    if "labels" in batch:
        rows.append(("gramian", "PathRecorder(half the batch vs the other half).start()", gramian, None))
    if not train_mode:  # the Monitor puts the model in eval mode itself
        rows.append(("Monitor economy", "Monitor(probes='economy').measure()", economy,
                     lambda e: ("budget_mb=4096", lambda: economy(4096))
                     if isinstance(e, MemoryBudgetError) else None))
    return rows


def run_model(z: zoo.ZooModel, label: str, train_mode: bool = False, log=print, budget: int = BUDGET) -> list[Row]:
    if train_mode:
        z.model.train()
    rows = []
    for probe, call, fn, fix in probe_calls(z, train_mode, budget):
        row = attempt(label, probe, call, fn)
        rows.append(row)
        log(_line(row))
        retry = fix(row.error) if fix is not None and row.status == "refused" else None
        if retry is not None:
            call2, fn2 = retry
            row2 = attempt(label, probe, f"{call2} (the fix)", fn2)
            rows.append(row2)
            log(_line(row2))
    return rows


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _line(r: Row) -> str:
    peak = "" if r.peak_mib is None else f"{r.peak_mib:8.0f} MiB"
    return f"{r.model:22s} {r.probe:18s} {r.status:8s} {r.seconds:8.1f} s {peak}  {r.call}: {r.value}"


INTRO = """\
Every probe, called once as a user would call it first, on the zoo's models at their usual small
sizes (`lmech.integrations.zoo`, random init from configs, nothing downloaded): GPT-2 124M
(`GPT2Config()`'s dimensions), BERT-base 110M (`BertConfig()`'s, a 3-class head) and ResNet-18
(11.2M at 10 classes; 11.7M with ImageNet's 1,000). The ResNet-18 is `transformers`' `ResNetForImageClassification` from a
ResNet-18 `ResNetConfig` (basic blocks, BatchNorm), not torchvision's: the package registry has
no torchvision CPU wheel for torch 2.13. *works*: the probe returned and its main value is finite;
*refused*: it raised one line on purpose (an `LmechError`, or raised in lmech's own code) naming
the cause and the fix, and the next row applies that fix; *DEFECT*: anything else (a traceback
out of torch or transformers, a non-finite main value). Seconds are wall time on a shared 2-core
machine (absolute times inflated by other jobs); peak RSS is the process's peak resident set
during the call (model included).

BatchNorm in training mode (the ResNet's "train mode" rows; the Monitor always measures in eval
mode): the Hessian probes (sharpness, trace, spectral density) measure the Hessian of the
batch-statistics loss and leave the running statistics as they were (updates go to copies); the
NTK and gradient noise refuse (per-example quantities are undefined when BatchNorm mixes the
examples), naming `model.eval()`; the weights probe reads the weights only; `layer_features`
runs the model as it is (batch statistics) and restores the running statistics it wrote; the
path recorder (`gramian`) evaluates in eval mode itself.
"""


def markdown(rows: list[Row], header: str) -> str:
    lines = [INTRO, header, "", "| model | probe | call | result | value / message | seconds | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        value = r.value.replace("|", "\\|")
        peak = "" if r.peak_mib is None else f"{r.peak_mib:,.0f}"
        lines.append(f"| {r.model} | {r.probe} | `{r.call}` | {r.status} | {value} | {r.seconds:.1f} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="base", choices=["tiny", "small", "base"])
    ap.add_argument("--models", default="gpt2,bert,resnet18")
    ap.add_argument("--examples", type=int, default=None, help="sequences or images (default 4 / 8)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 64; tiny 6)")
    ap.add_argument("--image", type=int, default=None, help="image side (default 224; tiny 8)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-train-mode", action="store_true", help="skip the ResNet in training mode")
    ap.add_argument("--out", default=str(ROOT / "docs/results/usual-sizes.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tiny = args.size == "tiny"
    seq = args.seq or (6 if tiny else 64)
    image = args.image or (8 if tiny else 224)
    wanted = args.models.split(",")
    rows: list[Row] = []
    start = time.perf_counter()
    command = " ".join(argv if argv is not None else sys.argv[1:])
    for key in wanted:
        examples = args.examples or (8 if key == "resnet18" else 4)
        kw = {"image": image} if key == "resnet18" else {"seq": seq}
        z = zoo.ZOO[key](args.size, examples=examples, **kw)
        shape = "x".join(map(str, next(iter(z.batch.values())).shape))
        label = f"{z.name.split(' (')[0]} {z.num_params / 1e6:.1f}M"
        print(f"{label}: batch {shape}", flush=True)
        rows += run_model(z, label)
        if key == "resnet18" and not args.no_train_mode:
            z = zoo.ZOO[key](args.size, examples=examples, **kw)
            rows += run_model(z, label + " (train mode)", train_mode=True)
        if args.out:  # after every model: a long run that is stopped keeps what it measured
            write(args.out, rows, command, args.threads, time.perf_counter() - start, seq, image, args.examples)
    if args.out:
        print(f"wrote {args.out}")
    for r in rows:
        if r.status == "DEFECT":
            print(f"DEFECT {r.model} {r.probe}:", "".join(traceback.format_exception(r.error))[-2000:])
    return rows


def write(out: str, rows: list[Row], command: str, threads: int, seconds: float, seq: int, image: int,
          examples: int | None) -> None:
    defects = sum(r.status == "DEFECT" for r in rows)
    header = (f"Made by `{f'PYTHONPATH=src python scripts/usual_sizes.py {command}'.strip()}`"
              f" (torch {torch.__version__}, {threads} thread(s), {seconds / 60:.0f} min; "
              f"batches: GPT-2/BERT {examples or 4} x {seq} tokens, ResNet {examples or 8} images "
              f"{image}x{image}; default memory budget {BUDGET / 2**30:.0f} GiB, the Monitor's 512 MiB). "
              f"{len(rows)} calls: {sum(r.status == 'works' for r in rows)} work, "
              f"{sum(r.status == 'refused' for r in rows)} refused in one line, {defects} defects.")
    Path(out).write_text("# Probes at the usual sizes\n\n" + markdown(rows, header))

if __name__ == "__main__":
    main()
