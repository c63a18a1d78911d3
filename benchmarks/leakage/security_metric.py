"""Security-metric benchmark: what the end-to-end analysis costs, and how well it predicts attacks.

Sections (each a function of the parsed arguments returning a JSON-able dict; run any subset,
the others keep their last saved result):

* cost: seconds of the end-to-end identifiability analysis (`audits.security.identifiability`) of CNN6 at
  3x32x32 (goal <= 10 s on two cores) and of a ResNet-18-width network at 32x32 (goal <= 10 min,
  matrix-free), and how the time grows with the input size and the parameter count;
* predicted: two PSNR ceilings against the best measured attack PSNR for the architectures of the
  zoo at several noise levels: Cramér–Rao (`audits.security.leakage_bound`, unbiased attackers, which
  biased ones can beat) and Van Trees under the photos' Gaussian prior (`audits.security.prior_bound`,
  any attacker); for each, Spearman's rank correlation and the share of cases an attack beat.

Timings depend on what else runs: each row records the 1-minute load average around it.

Usage: python -m benchmarks.leakage.security_metric [--sections cost,predicted] [--crops N];
writes benchmarks/results/security_metric.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from audits.security.identifiability import Identifiability, identifiability
from audits.security.leakage_bound import leakage_bound, psnr_ceiling
from benchmarks.paths import ROOT
from models import InputSpec, build_model
from models.classifiers import CNN6_CONVS, SequentialClassifier, conv_output_size
from models.convnets import ResidualBlock

OUTPUT = ROOT / "benchmarks" / "results" / "security_metric.json"
# One torch thread unless a row says otherwise: on the shared 2-core machine, one thread was two
# to three times faster than two whenever another process held a core.
THREADS = 1


def resnet18_width(spec: InputSpec) -> SequentialClassifier:
    """The CIFAR ResNet-18 (He et al. 2016, as in Kuang Liu's pytorch-cifar): a 3x3 64-channel
    stem, four stages of two basic blocks (64, 128, 256, 512 channels), global average pooling,
    a linear head; 11.2M parameters at 10 classes."""
    layers: list[nn.Module] = [
        nn.Conv2d(spec.shape[0], 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
    ]
    channels = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [ResidualBlock(channels, width, stride), ResidualBlock(width, width)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, spec.num_classes)]
    return SequentialClassifier(nn.Sequential(*layers), spec)


def scaled_cnn6(spec: InputSpec, width: float) -> SequentialClassifier:
    """CNN6 with every conv's channel count multiplied by `width` (parameters grow as width²)."""
    channels, height, _ = spec.shape
    layers: list[nn.Module] = []
    for out_channels, kernel, stride, padding in CNN6_CONVS:
        out = max(1, round(out_channels * width))
        layers += [nn.Conv2d(channels, out, kernel, stride, padding, bias=False), nn.LeakyReLU(0.2)]
        channels, height = out, conv_output_size(height, kernel, stride, padding)
    layers += [nn.Flatten(), nn.Linear(channels * height * height, spec.num_classes)]
    return SequentialClassifier(nn.Sequential(*layers), spec)


def _analyse(
    label: str, model: nn.Module, size: int, method: str = "auto", threads: int = THREADS, **options: Any
) -> dict[str, Any]:
    """One timed end-to-end analysis on a seeded uniform input, with the load around it."""
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    load_before = os.getloadavg()[0]
    result = identifiability(model, x, torch.tensor([3]), method, threads=threads, **options)
    row = _row(label, result)
    row["threads"] = threads
    row["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(
        f"{label:28s} D={result.unknowns:5d} P={result.parameters:9d} {result.method:10s} "
        f"{result.seconds:8.1f} s ({threads} thread(s))  rank {result.rank}  deficit {result.deficit}  "
        f"load {row['load_average']}"
    )
    return row


def _row(label: str, result: Identifiability) -> dict[str, Any]:
    values = result.singular_values
    return {
        "model": label,
        "unknowns": result.unknowns,
        "parameters": result.parameters,
        "method": result.method,
        "dtype": result.dtype,
        "seconds": round(result.seconds, 2),
        "rank": result.rank,
        "deficit": result.deficit,
        "unseen_inputs": result.unseen_inputs,
        "s_max": float(values[0]) if len(values) else None,
        "s_min_reported": float(values[values > result.tolerance][-1])
        if (values > result.tolerance).any()
        else None,
        "cost": result.cost,
        "tolerance_rule": result.tolerance_rule,
    }


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares exponent of y ~ x^k."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def cost_section(args: argparse.Namespace) -> dict[str, Any]:
    spec = InputSpec((3, 32, 32), 10)
    torch.manual_seed(0)
    cnn6 = [_analyse("cnn6 3x32x32", build_model("cnn6", spec), 32, threads=t) for t in (1, 2)]
    torch.manual_seed(0)
    resnet = _analyse(
        "resnet18-width 3x32x32",
        resnet18_width(spec),
        32,
        "randomized",
        top_k=args.resnet_top_k,
        power_steps=2,
    )
    by_size = []
    for size in (8, 16, 24, 32):
        torch.manual_seed(0)
        by_size.append(
            _analyse(
                f"cnn6 3x{size}x{size}", build_model("cnn6", InputSpec((3, size, size), 10)), size, "gram"
            )
        )
    by_width = []
    for width in (0.5, 1.0, 2.0, 4.0):
        torch.manual_seed(0)
        model = scaled_cnn6(InputSpec((3, 16, 16), 10), width)
        by_width.append(_analyse(f"cnn6 x{width:g} channels 3x16x16", model, 16, "gram"))
    growth = {
        "seconds_vs_inputs_exponent": _slope(
            [r["unknowns"] for r in by_size], [r["seconds"] for r in by_size]
        ),
        "seconds_vs_parameters_exponent": _slope(
            [r["parameters"] for r in by_width], [r["seconds"] for r in by_width]
        ),
    }
    print(
        f"time grows as D^{growth['seconds_vs_inputs_exponent']:.2f} (CNN6, 8..32 px) and as "
        f"P^{growth['seconds_vs_parameters_exponent']:.2f} (CNN6 widths x0.5..x4 at 16 px)"
    )
    return {
        "goals": {"cnn6_seconds": 10, "resnet18_width_seconds": 600},
        "cnn6": cnn6,
        "resnet18_width": resnet,
        "by_input_size": by_size,
        "by_parameter_count": by_width,
        "growth": growth,
    }


# The zoo's image classifiers: R-GAP's nets, LeNet, the MLP and the ReLU / BatchNorm / pooling /
# residual variants.
ARCHITECTURES = (
    "cnn6",
    "cnn6-d",
    "lenet",
    "mlp",
    "cnn6-relu",
    "convnet-bn",
    "convnet-maxpool",
    "resnet-mini",
)
# Noise std per gradient entry added to the exact gradient the attacks see.
NOISE_LEVELS = (1e-6, 1e-5, 1e-4)


def predicted_section(args: argparse.Namespace) -> dict[str, Any]:
    """Per architecture and crop: one end-to-end analysis and one float64 Fisher Gram; per noise
    level: the Cramér–Rao ceiling (unbiased attackers), the Van Trees ceiling under the photos'
    own Gaussian prior (any attacker), and every attack on the noisy gradient (seeded noise, told
    to the attacks). Attack results of an earlier run with the same settings are reused, so a
    fix to the analysis does not rerun the attacks."""
    from attacks.base import observe_gradient
    from attacks.registry import available_attacks, build_attack
    from audits.architecture.standalone import threat_label, with_gradient_noise
    from audits.scoring.engine import AuditContext, Truth, UpdateAuditor
    from audits.security.identifiability import fisher_gram
    from audits.security.prior_bound import PriorBounds, data_prior_covariance
    from fedsim.data import load_dataset
    from fedsim.data.photos import photo_crops

    crops, labels = photo_crops(args.crops, 32, seed=args.crop_seed)
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()] or available_attacks()
    auditor = UpdateAuditor([build_attack(a) for a in attacks])
    prior = data_prior_covariance(load_dataset("photos").x_train)
    settings = {
        "crops": args.crops,
        "crop_seed": args.crop_seed,
        "noise_levels": list(NOISE_LEVELS),
        "attacks": attacks,
        "prior": "Ledoit-Wolf covariance of the photos training split (2000 crops)",
    }
    saved = _load(args.output).get("predicted") or {}
    # The prior only changes the analysis, so attack results under another prior still count.
    same = _without_prior(saved.get("settings") or {}) == _without_prior(settings)
    earlier = {(c["model"], c["crop"], c["sigma"]): c["psnr"] for c in saved.get("cases", [])} if same else {}
    done = {c["model"] for c in saved.get("cases", []) if "prior_psnr_ceiling" in c} if same else set()
    cases = [c for c in saved.get("cases", []) if c["model"] in done]
    # Cases still to redo stay in the file with their attack results until redone.
    pending = [c for c in saved.get("cases", []) if c["model"] not in done] if same else []
    for name in ARCHITECTURES:
        if name in done:
            print(f"{name:16s} kept from the interrupted run")
            continue
        for index, (crop, label) in enumerate(zip(crops, labels, strict=True)):
            torch.manual_seed(0)
            model = build_model(name, InputSpec((3, 32, 32), 10))
            x, y = torch.from_numpy(crop[None]), torch.tensor([int(label)])
            ident = identifiability(model, x, y, threads=THREADS)
            started = time.perf_counter()
            bounds = PriorBounds(fisher_gram(model, x, y, threads=THREADS), prior)
            gram_seconds = time.perf_counter() - started
            exact = observe_gradient(model, x, y)
            for sigma in NOISE_LEVELS:
                bound = leakage_bound(ident, sigma, f"gaussian {sigma:g}", peak=1.0)
                psnrs = earlier.get((name, index, sigma))
                if psnrs is None:
                    update = with_gradient_noise(exact, sigma, seed=0, sample=index)
                    context = AuditContext(threat_label(sigma), sample=index)
                    audit = auditor.audit(update, Truth(crop[None], np.array([int(label)])), context)
                    psnrs = {r.attack: r.psnr for r in audit.rows if r.psnr is not None}
                best = max(psnrs, key=psnrs.get) if psnrs else None
                case = {
                    "model": name,
                    "crop": index,
                    "sigma": sigma,
                    "deficit": ident.deficit,
                    "psnr_ceiling": bound.psnr_ceiling,
                    "prior_psnr_ceiling": bounds.at(sigma).psnr_ceiling,
                    "prior_only_psnr": psnr_ceiling(bounds.prior_mse, 1.0),
                    "best_attack": best,
                    "best_psnr": psnrs.get(best) if best else None,
                    "psnr": psnrs,
                    "identifiability_seconds": round(ident.seconds, 1),
                    "fisher_gram_seconds": round(gram_seconds, 1),
                }
                cases.append(case)
                print(
                    f"{name:16s} crop {index} sigma {sigma:7.0e}  deficit {ident.deficit}  "
                    f"ceilings CR {_fmt(bound.psnr_ceiling)} / prior {_fmt(case['prior_psnr_ceiling'])} dB  "
                    f"best {_fmt(case['best_psnr'])} dB ({best})"
                )
        waiting = [c for c in pending if c["model"] not in {case["model"] for case in cases}]
        progress = {"settings": settings, "cases": cases + waiting, "complete": False}
        _save_section(args.output, "predicted", progress)
    summary = {"cases": len(cases)}
    for key, label in (("psnr_ceiling", "cramer_rao"), ("prior_psnr_ceiling", "van_trees")):
        summary[label] = _agreement(cases, key)
        print(
            f"{label:10s} ceiling: Spearman with the best attack PSNR {summary[label]['spearman']:.3f} over "
            f"{summary[label]['cases']} cases; an attack beat it in {len(summary[label]['above_ceiling'])}"
        )
    return {"settings": settings, "summary": summary, "cases": cases, "complete": True}


def _without_prior(settings: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in settings.items() if key != "prior"}


def _agreement(cases: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Spearman's rank correlation of one predicted ceiling with the best measured attack, and
    the cases where an attack beat it."""
    from scipy.stats import spearmanr

    scored = [c for c in cases if c[key] is not None and c["best_psnr"] is not None]
    rho = spearmanr([c[key] for c in scored], [c["best_psnr"] for c in scored])
    above = [c for c in scored if c["best_psnr"] > c[key]]
    return {
        "cases": len(scored),
        "spearman": float(rho.statistic),
        "spearman_p": float(rho.pvalue),
        "share_above_ceiling": len(above) / len(scored) if scored else None,
        "above_ceiling": [(c["model"], c["crop"], c["sigma"], c["best_attack"]) for c in above],
    }


def _fmt(value: float | None) -> str:
    return "   -" if value is None else f"{value:6.1f}"


SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "cost": cost_section,
    "predicted": predicted_section,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}"
    )
    parser.add_argument(
        "--resnet-top-k", type=int, default=32, help="singular values of the ResNet-18 estimate"
    )
    parser.add_argument("--crops", type=int, default=2, help="natural crops per architecture (predicted)")
    parser.add_argument("--crop-seed", type=int, default=3)
    parser.add_argument("--attacks", default="", help="comma-separated registry names (default: all)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    torch.set_num_threads(THREADS)
    results = _load(args.output)
    results["machine"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": THREADS,
        "cpus": os.cpu_count(),
    }
    for name in chosen:
        start = time.perf_counter()
        results[name] = SECTIONS[name](args)
        results[name]["section_seconds"] = round(time.perf_counter() - start, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=_plain) + "\n")
    print(f"saved {args.output}")


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _save_section(path: Path, name: str, section: dict[str, Any]) -> None:
    """Write one section into the results file now (progress of a long section survives a kill)."""
    results = _load(path)
    results[name] = section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    main()
