"""The client-side defences of `--defence`, each from the library that implements it.

- `dp-sgd`: Opacus's `PrivacyEngine.make_private` (Abadi et al. 2016): per-sample gradients
  clipped to C, Gaussian noise of std z·C on their sum, Poisson-sampled batches, and its RDP
  accountant for the ε this round spent.
- `clip`, `topk`, `gaussian`: transformations of the finished update Δ = w_local − w_global
  over every floating-point state entry the client sends (as Flower's clipping mods treat a
  model; `global_state` holds exactly the sent entries, `ZooModel.sent_names`), in the order
  the user lists them: L2 clipping of the whole update (Flower's `compute_clip_model_update`),
  keeping each tensor's largest entries (DLG's "gradient pruning", Zhu et al. 2019, §5), and
  Gaussian noise without accounting (for comparison with DP-SGD at equal distortion).

`check_client_defences` holds the plan-time checks: a combination that cannot work fails before
anything is written, with one line that says why and what to do.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.supercore.differential_privacy import compute_clip_model_update
from torch import nn
from torch.utils.data import DataLoader

from fedsim.config.run_config import RunConfig
from fedsim.errors import UserInputError
from fedsim.training.run_model import build_run_model
from fedsim.training.transforms import TRANSFORMATIONS, PrivacySpend, TransformationEntry
from models import InputSpec

if TYPE_CHECKING:
    from opacus import PrivacyEngine

# Opacus is imported where DP-SGD runs or is checked, not with this module: it costs every
# `fedsim` command (and every client) more than a second to load.

DP_SGD = "dp-sgd"
# Opacus's accountant: Rényi DP (Mironov 2017), which Flower's central-DP accountant also uses.
ACCOUNTANT = "rdp"


class TripleUntouched:
    """Base of the update-level defences: they leave the training triple as it is."""

    def wrap(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        return module, optimizer, data_loader

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module

    def privacy_spent(self) -> PrivacySpend | None:
        return None  # no accountant: an update-level distortion proves no (ε, δ)


class DpSgd:
    """DP-SGD through Opacus, one fresh `PrivacyEngine` per local round.

    With `target_epsilon` > 0 the noise multiplier is calibrated by Opacus's `get_noise_multiplier`
    (what `make_private_with_epsilon` calls) so that `rounds` rounds of this client's local steps
    spend (target ε, δ): the target is each client's budget for the whole run *if it trains every
    round*; a client sampled less often spends less. The calibration counts the steps a round
    really takes (`max_local_steps` caps them), where `make_private_with_epsilon` would assume whole
    epochs and add far more noise than needed to a FedSGD round.

    Noise comes from torch's global generator, which the client loop seeds per (seed, round,
    partition), and Poisson batches from the loader's seeded generator: runs repeat bit for bit.
    Opacus's `secure_mode` would draw from /dev/urandom and give that up, so it stays off.
    """

    name = DP_SGD

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.noise_multiplier = config.noise_multiplier  # the calibrated one once wrapped
        self.engine: PrivacyEngine | None = None
        self.sample_rate = 0.0

    @property
    def label(self) -> str:
        return f"{DP_SGD}(z={self.noise_multiplier:.4g},C={self.config.max_grad_norm:g})"

    def wrap(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        from opacus import PrivacyEngine
        from opacus.accountants.utils import get_noise_multiplier

        with warnings.catch_warnings():  # deterministic runs need the seeded generator (see above)
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            self.engine = PrivacyEngine(accountant=ACCOUNTANT)
        # Torch warns on every backward that the first layer's hook sees no input gradient; Opacus
        # needs only the output gradient there, so the warning says nothing about this run.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        self.sample_rate = 1 / len(data_loader)  # Opacus's q: one expected batch of the loader
        if self.config.target_epsilon > 0:
            self.noise_multiplier = get_noise_multiplier(
                target_epsilon=self.config.target_epsilon,
                target_delta=self.config.target_delta,
                sample_rate=self.sample_rate,
                steps=self.config.rounds * self._steps_per_round(len(data_loader)),
                accountant=ACCOUNTANT,
            )
        # Our models' losses are batch means (ZooModel.loss), hence loss_reduction="mean".
        return self.engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            poisson_sampling=self.config.poisson_sampling,
            loss_reduction="mean",
        )

    def _steps_per_round(self, batches_per_epoch: int) -> int:
        steps = self.config.local_epochs * batches_per_epoch
        return min(steps, self.config.max_local_steps) if self.config.max_local_steps else steps

    def unwrap(self, module: nn.Module) -> nn.Module:
        from opacus.grad_sample import GradSampleModule

        if not isinstance(module, GradSampleModule):
            raise RuntimeError(f"{DP_SGD} was handed {type(module).__name__} to unwrap, not its own wrapper")
        model = module.to_standard_module()  # removes its hooks and the per-parameter grad_sample
        for parameter in model.parameters():  # DPOptimizer's clipped sum of the last step
            if hasattr(parameter, "summed_grad"):
                del parameter.summed_grad
        for layer in model.modules():  # what the hooks left on the layers (emptied, not removed)
            for attribute in ("activations", "max_batch_len"):
                if hasattr(layer, attribute):
                    delattr(layer, attribute)
        return model

    def privacy_spent(self) -> PrivacySpend | None:
        """This round's ε at the run's δ by Opacus's RDP accountant, from the (z, q, steps) it
        recorded. Without Poisson sampling (`sampling="shuffle"`) the ε still assumes Poisson
        sampling, as Opacus's accountant always does; shuffled batches only approximate it."""
        if self.engine is None:
            return None
        history = self.engine.accountant.history  # [(noise multiplier, sample rate, steps)]
        steps = sum(entry[2] for entry in history)
        return PrivacySpend(
            mechanism=DP_SGD,
            epsilon=float(self.engine.accountant.get_epsilon(self.config.target_delta)) if steps else 0.0,
            delta=self.config.target_delta,
            noise_multiplier=float(self.noise_multiplier),
            clip_norm=self.config.max_grad_norm,
            sample_rate=float(self.sample_rate),
            steps=int(steps),
            sampling="poisson" if self.config.poisson_sampling else "shuffle",
        )

    def finish(
        self, model: nn.Module, global_state: Mapping[str, torch.Tensor], generator: torch.Generator
    ) -> None:
        """Nothing: the noise went into every step."""


class ClipUpdate(TripleUntouched):
    """Scale the whole update down to L2 norm `clipping_norm` when it is longer (McMahan et al.
    2018's flat clipping), with Flower's own `compute_clip_model_update`."""

    name = "clip"

    def __init__(self, config: RunConfig) -> None:
        self.clipping_norm = config.clipping_norm

    @property
    def label(self) -> str:
        return f"clip(C={self.clipping_norm:g})"

    @torch.no_grad()
    def finish(
        self, model: nn.Module, global_state: Mapping[str, torch.Tensor], generator: torch.Generator
    ) -> None:
        state = _float_state(model, global_state)
        local = [tensor.numpy().copy() for tensor in state.values()]
        start = [global_state[name].numpy() for name in state]
        if all(np.array_equal(a, b) for a, b in zip(local, start, strict=True)):
            return  # a zero update: nothing to clip (Flower's clip would divide by its zero norm)
        compute_clip_model_update(local, start, self.clipping_norm)  # local := start + clipped update
        for tensor, clipped in zip(state.values(), local, strict=True):
            tensor.copy_(torch.from_numpy(np.asarray(clipped, dtype=clipped.dtype)))


class TopKUpdate(TripleUntouched):
    """Keep the `keep` share (at least one) of each tensor's update entries with the largest
    magnitude and send the global value for the rest: DLG's gradient pruning (Zhu et al. 2019,
    §5), which it found to stop the attack from about 20 % pruned on."""

    name = "topk"

    def __init__(self, config: RunConfig) -> None:
        self.keep = config.keep

    @property
    def label(self) -> str:
        return f"topk({self.keep:g})"

    @torch.no_grad()
    def finish(
        self, model: nn.Module, global_state: Mapping[str, torch.Tensor], generator: torch.Generator
    ) -> None:
        for name, tensor in _float_state(model, global_state).items():
            start = global_state[name]
            magnitude = (tensor - start).abs().reshape(-1)
            kept = torch.zeros_like(magnitude, dtype=torch.bool)
            kept[torch.topk(magnitude, kept_entries(self.keep, magnitude.numel())).indices] = True
            # Dropped entries take the global value itself, so their update is exactly zero.
            tensor.copy_(torch.where(kept.reshape(tensor.shape), tensor, start))


def kept_entries(keep: float, count: int) -> int:
    """⌈keep · count⌉, at least one; rounded first so that 0.1 · 30 keeps 3, not 4."""
    return max(1, math.ceil(round(keep * count, 9)))


class GaussianUpdate(TripleUntouched):
    """Add N(0, noise_std²) to every update entry, drawn from the round's seeded generator.
    No accountant: without clipping the update's sensitivity is unbounded, so this proves no ε."""

    name = "gaussian"

    def __init__(self, config: RunConfig) -> None:
        self.noise_std = config.noise_std

    @property
    def label(self) -> str:
        return f"gaussian(std={self.noise_std:g})"

    @torch.no_grad()
    def finish(
        self, model: nn.Module, global_state: Mapping[str, torch.Tensor], generator: torch.Generator
    ) -> None:
        for tensor in _float_state(model, global_state).values():
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * self.noise_std
            tensor.add_(noise.to(tensor.dtype))


def _float_state(model: nn.Module, sent: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's floating-point state entries among the `sent` ones (parameters and float
    buffers), as views that write through, in the order sent; integer buffers (e.g. BatchNorm's
    step count) are not part of an update, and entries not sent are no part of it either."""
    state = model.state_dict(keep_vars=False)
    return {name: state[name] for name in sent if state[name].is_floating_point()}


TRANSFORMATIONS.update(
    {
        DP_SGD: TransformationEntry(
            DpSgd,
            "Opacus DP-SGD: clip each sample's gradient to C, add N(0, (zC)²) each step; reports ε (RDP).",
            ("noise-multiplier", "max-grad-norm", "target-epsilon", "target-delta", "poisson-sampling"),
        ),
        "clip": TransformationEntry(
            ClipUpdate,
            "Clip the whole update w_local - w_global to L2 norm C (Flower's flat clipping).",
            ("clipping-norm",),
        ),
        "topk": TransformationEntry(
            TopKUpdate,
            "Keep each tensor's largest-magnitude share of update entries, zero the rest (DLG's pruning).",
            ("keep",),
        ),
        "gaussian": TransformationEntry(
            GaussianUpdate,
            "Add N(0, std²) noise to every update entry; no clipping, so no ε is accounted.",
            ("noise-std",),
        ),
    }
)


def check_client_defences(config: RunConfig, spec: InputSpec) -> None:
    """Plan-time checks of the `--defence` list against the other knobs and the model."""
    names = config.transformation_names()
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserInputError(
            f"--defence lists {', '.join(repeated)} more than once; list each defence once, in the order "
            "they apply"
        )
    if config.target_epsilon > 0 and DP_SGD not in names:
        raise UserInputError(
            f"--target-epsilon {config.target_epsilon:g} calibrates DP-SGD's noise, but --defence has no "
            f"{DP_SGD}; add {DP_SGD} to --defence or drop --target-epsilon"
        )
    if DP_SGD not in names:
        return
    if config.noise_multiplier == 0 and config.target_epsilon == 0:
        raise UserInputError(
            f"{DP_SGD} with --noise-multiplier 0 adds no noise, so its ε would be infinite; pass "
            "--noise-multiplier above 0 (e.g. 1.1) or --target-epsilon"
        )
    if config.strategy == "fedprox":
        raise UserInputError(
            f"{DP_SGD} with fedprox: Opacus's optimiser replaces the gradient with its clipped, noised "
            "per-sample sum, which drops FedProx's proximal term; use --strategy fedavg"
        )
    check_opacus_accepts(config.model, spec, config.model_options)


def check_opacus_accepts(model_name: str, spec: InputSpec, options: str = "") -> None:
    """Opacus's `ModuleValidator` on the run's model; a rejection names the layer and the fix
    Opacus offers (its registered fixer's replacement, what `ModuleValidator.fix` would do)."""
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    model = build_run_model(model_name, spec, options)
    if not model.per_sample_loss:
        raise UserInputError(
            f"{DP_SGD} with model {model_name!r}: its loss couples the samples of a batch (a contrastive "
            "term), so per-sample clipping bounds no one sample's influence; use --central-dp server, "
            "or --defence clip/gaussian"
        )
    if not ModuleValidator.validate(model, strict=False):
        _check_per_sample_gradients(model_name, model)
        return
    for layer_name, layer in trainable_modules(model):
        validator = ModuleValidator.VALIDATORS.get(type(layer))
        errors = validator(layer) if validator is not None else []
        if errors:
            reason = str(errors[0]).split(". ")[0].rstrip(".")
            fixer = ModuleValidator.FIXERS.get(type(layer))
            fix = (
                f"replace it with {fixer(layer)} as Opacus's ModuleValidator.fix does"
                if fixer is not None
                else "replace that layer"
            )
            raise UserInputError(
                f"{DP_SGD} cannot train model {model_name!r}: Opacus rejects layer {layer_name!r} "
                f"({type(layer).__name__}: {reason}); {fix}, or drop {DP_SGD} from --defence"
            )
    problems = "; ".join(str(err).split(". ")[0] for err in ModuleValidator.validate(model, strict=False))
    raise UserInputError(
        f"{DP_SGD} cannot train model {model_name!r}: {problems}; drop {DP_SGD} from --defence"
    )


def _check_per_sample_gradients(model_name: str, model: nn.Module) -> None:
    """`GradSampleModule`'s own check, which `make_private` runs on the clients: a trainable layer
    holding buffers (DAM's gates keep their pruning state in one) gets no per-sample gradient.
    Found at planning, it is one line instead of every client failing round 1."""
    from opacus.grad_sample import GradSampleModule
    from opacus.utils.module_utils import trainable_modules

    layers = [
        name or type(layer).__name__  # the model itself holds parameters (ProtoPNet's prototypes)
        for name, layer in trainable_modules(model)
        if next(layer.buffers(), None) is not None
    ]
    if GradSampleModule.validate(model, strict=False):
        raise UserInputError(
            f"{DP_SGD} cannot train model {model_name!r}: Opacus computes no per-sample gradient for "
            f"a trainable layer that keeps buffers ({', '.join(layers)}); drop {DP_SGD} from --defence, "
            "or use --central-dp server"
        )
