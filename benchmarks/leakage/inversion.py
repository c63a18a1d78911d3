"""Inversion benchmark: layer-wise inversion vs DLG vs Inverting Gradients on one target.

For CNN6 and CNN6-d (R-GAP's nets, 10-class CE head, seeded random init) and one natural
32×32 photo crop, every attack inverts the same exact batch-1 gradient in this run; the table
gives seconds, PSNR, SSIM and whether the label came out right. It also times the security
metric for every model in the registry.

`--weight-delta` measures instead what a federated server sees: one float32 SGD step of a
seeded CNN6 on each of 30 natural crops (batch 1), the weights before and after turned into a
gradient by `ObservedUpdate.from_weight_delta` (float32 rounding / lr is its noise), at
lr 0.1 and 0.01; layer-wise inversion with the update's noise model (generalised least
squares, propagated errors, noise-aware sign repair) and, as an ablation, without it.

Usage: python -m benchmarks.leakage.inversion [--dlg-steps N] [--ig-steps N];
writes benchmarks/results/inversion.json.
python -m benchmarks.leakage.inversion --weight-delta; writes benchmarks/results/inversion_weight_delta.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from attacks.base import ObservedUpdate, observe_gradient
from attacks.layerwise import LayerwiseInversion
from attacks.optimisation.gradient_matching import DLG, InvertingGradients
from audits.security.metric import security_report
from audits.similarity.image import reported_psnr, ssim
from benchmarks.paths import ROOT
from fedsim.data.photos import photo_crops
from models import InputSpec, available_models, build_model

SHAPE = (3, 32, 32)


def run_attacks(model_name: str, dlg_steps: int, ig_steps: int, crop_seed: int) -> list[dict[str, object]]:
    x, y = photo_crops(1, seed=crop_seed)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    torch.manual_seed(0)
    model = build_model(model_name, InputSpec(SHAPE, 10))
    update = observe_gradient(model, inputs, labels)
    attacks = [
        LayerwiseInversion(),
        LayerwiseInversion(hybrid=True),
        DLG(iterations=dlg_steps),
        InvertingGradients(iterations=ig_steps),
    ]
    rows = []
    for attack in attacks:
        start = time.perf_counter()
        rec = attack.reconstruct(update)
        seconds = time.perf_counter() - start
        out = rec.inputs.clamp(0, 1)
        rows.append(
            {
                "model": model_name,
                "attack": attack.name,
                "budget": getattr(attack, "iterations", None),
                "seconds": seconds,
                "psnr": float(reported_psnr(inputs, out)[0]),
                "ssim": float(ssim(inputs, out)[0]),
                "label_correct": None if rec.labels is None else int(rec.labels[0]) == int(labels[0]),
            }
        )
        print(
            f"{model_name:7s} {attack.name:20s} {seconds:7.2f} s  PSNR {rows[-1]['psnr']:6.1f} dB  "
            f"SSIM {rows[-1]['ssim']:.3f}  label {rows[-1]['label_correct']}"
        )
    return rows


def time_security_metric() -> list[dict[str, object]]:
    rows = []
    for name in available_models():
        torch.manual_seed(0)
        model = build_model(name, InputSpec(SHAPE, 10))
        report = security_report(model, SHAPE)
        rows.append(
            {
                "model": name,
                "seconds": report.seconds,
                "score": report.score,
                "ra_index": report.ra_index,
                "deficits": [layer.deficit for layer in report.layers],
            }
        )
        print(
            f"security metric {name:7s} {report.seconds:6.2f} s  score {report.score}  RA-i {report.ra_index}"
        )
    return rows


WEIGHT_DELTA_LRS = (0.1, 0.01)
# (model seed, crop seed): the crops the targets were set on, and a second, held-out set
WEIGHT_DELTA_SETS = ((0, 0), (1, 5))


def weight_delta_update(model: torch.nn.Module, image: np.ndarray, label: int, lr: float) -> ObservedUpdate:
    """The server's view of one float32 SGD step on one sample: weights before and after."""
    exact = observe_gradient(model, torch.from_numpy(image[None]), torch.tensor([label]))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    after = {k: (v - lr * exact.gradients[k]).float() for k, v in before.items()}
    return ObservedUpdate.from_weight_delta(model, before, after, lr, 1, SHAPE, 10)


def run_weight_delta(
    crops: int, sets: tuple[tuple[int, int], ...], ablation: bool = True
) -> list[dict[str, object]]:
    rows = []
    for model_seed, crop_seed in sets:
        torch.manual_seed(model_seed)
        model = build_model("cnn6", InputSpec(SHAPE, 10))
        images, labels = photo_crops(crops, seed=crop_seed)
        for lr in WEIGHT_DELTA_LRS:
            for variant in ("noise-aware", "without noise model")[: 2 if ablation else 1]:
                psnrs, seconds, labels_ok, fallbacks, used = [], [], 0, 0, 0
                for image, label in zip(images, labels, strict=True):
                    update = weight_delta_update(model, image, int(label), lr)
                    if variant != "noise-aware":
                        update.gradient_noise = None
                    start = time.perf_counter()
                    rec = LayerwiseInversion().reconstruct(update)
                    seconds.append(time.perf_counter() - start)
                    psnrs.append(
                        float(reported_psnr(torch.from_numpy(image[None]), rec.inputs.clamp(0, 1))[0])
                    )
                    labels_ok += int(rec.labels[0]) == int(label)
                    fallbacks += sum("fallback" in d for d in rec.diagnostics["layers"])
                    used += bool(rec.diagnostics.get("noise_model", {}).get("used"))
                p = np.asarray(psnrs)
                rows.append(
                    {
                        "model": "cnn6",
                        "model_seed": model_seed,
                        "crop_seed": crop_seed,
                        "crops": crops,
                        "lr": lr,
                        "variant": variant,
                        "psnr_min": float(p.min()),
                        "psnr_median": float(np.median(p)),
                        "psnr_max": float(p.max()),
                        "below_40_db": int((p < 40).sum()),
                        "seconds_median": float(np.median(seconds)),
                        "seconds_mean": float(np.mean(seconds)),
                        "seconds_max": float(np.max(seconds)),
                        "labels_correct": labels_ok,
                        "stacked_fallbacks": fallbacks,
                        "noise_model_used": used,
                        "psnr": [round(v, 2) for v in psnrs],
                    }
                )
                r = rows[-1]
                print(
                    f"cnn6 seed {model_seed} crops {crop_seed} lr {lr:<5} {variant:20s} PSNR min "
                    f"{r['psnr_min']:5.1f} median {r['psnr_median']:5.1f} max {r['psnr_max']:5.1f} dB  "
                    f"s median {r['seconds_median']:.2f} mean {r['seconds_mean']:.2f} "
                    f"max {r['seconds_max']:.2f}  labels {labels_ok}/{crops}",
                    flush=True,
                )
    return rows


def _code_version() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True)
        return out.stdout.decode().strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dlg-steps", type=int, default=50, help="L-BFGS steps (paper: 300)")
    parser.add_argument("--ig-steps", type=int, default=2000, help="Adam steps (paper: 24,000)")
    parser.add_argument("--crop-seed", type=int, default=3)
    parser.add_argument("--weight-delta", action="store_true", help="the weight-delta section only")
    parser.add_argument("--crops", type=int, default=30, help="crops per set (--weight-delta)")
    parser.add_argument(
        "--no-ablation", action="store_true", help="skip the run without the noise model (--weight-delta)"
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results_dir = ROOT / "benchmarks" / "results"
    if args.weight_delta:
        results = {
            "machine": {"python": platform.python_version(), "torch_threads": 1},
            "code": _code_version(),
            "weight_delta": run_weight_delta(args.crops, WEIGHT_DELTA_SETS, not args.no_ablation),
        }
        output = args.output or results_dir / "inversion_weight_delta.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"saved {output}")
        return
    results = {
        "machine": {"python": platform.python_version(), "torch_threads": 1},
        "attacks": [
            r
            for m in ("cnn6", "cnn6-d")
            for r in run_attacks(m, args.dlg_steps, args.ig_steps, args.crop_seed)
        ],
        "security_metric": time_security_metric(),
    }
    output = args.output or results_dir / "inversion.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {output}")


if __name__ == "__main__":
    main()
