"""Inversion benchmark: layer-wise inversion vs DLG vs Inverting Gradients on one target.

For CNN6 and CNN6-d (R-GAP's nets, 10-class CE head, seeded random init) and one natural
32×32 photo crop, every attack inverts the same exact batch-1 gradient in this run; the table
gives seconds, PSNR, SSIM and whether the label came out right. It also times the security
metric for every model in the registry.

Usage: python benchmarks/inversion.py [--dlg-steps N] [--ig-steps N];
writes benchmarks/results/inversion.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attacks.base import observe_gradient  # noqa: E402
from attacks.layerwise import LayerwiseInversion  # noqa: E402
from attacks.optimisation import DLG, InvertingGradients  # noqa: E402
from audits.image_metrics import reported_psnr, ssim  # noqa: E402
from audits.security_metric import security_report  # noqa: E402
from fedsim.data.photos import photo_crops  # noqa: E402
from models import InputSpec, available_models, build_model  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dlg-steps", type=int, default=50, help="L-BFGS steps (paper: 300)")
    parser.add_argument("--ig-steps", type=int, default=2000, help="Adam steps (paper: 24,000)")
    parser.add_argument("--crop-seed", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "inversion.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {
        "machine": {"python": platform.python_version(), "torch_threads": 1},
        "attacks": [
            r
            for m in ("cnn6", "cnn6-d")
            for r in run_attacks(m, args.dlg_steps, args.ig_steps, args.crop_seed)
        ],
        "security_metric": time_security_metric(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
