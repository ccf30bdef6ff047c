"""The server-side methods: each one a registered object, runnable by name on the same clients.

A method is a :class:`Method`: its display metadata (label, colour, role, one-line summary) and
``run(ctx) -> MethodResult``. :func:`register_method` adds one to :data:`METHODS`, as timm's
``@register_model`` does for models; the command line, the benchmark, the Hub's model card and the
app read this registry, and :func:`check_config` checks a config's method names against it. The
config module itself knows no method (it is imported here, never the other way round); only its
default names, ``fedavg, ensemble, fedmitr``, are written there.

The inversion methods are one family, :class:`Rounds`, composed of three pluggable stages:

* ``inversion``: :class:`ModelInversion` (dense, or sparse: patches stop early);
* ``targets``: :class:`ClassTargets` (the class token only) or :class:`TokenRelabel` (every patch
  gets its own target);
* ``distillation``: :class:`Distillation` (class-token KD on the same view, plus the token loss
  when there are token targets).

A new variant is one registration in one file, e.g.::

    @register_method
    def fedmitr_image() -> Rounds:
        return Rounds(name="fedmitr-image", label="FedMITR, image relabel", colour="#b5179e",
                      role="ablation", summary="sparse inversion + image-level relabel",
                      inversion=ModelInversion(sparse=True),
                      targets=TokenRelabel(mode="image", high_ratio=0.2))

A stage with new behaviour is a small class with the same ``__call__`` (see each stage's docstring).

This module imports no torch: the command line lists and checks method names without loading it.
The built-in stages import their implementation when they run.
"""

from __future__ import annotations

import dataclasses
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, TypeVar

from fedmitr.config import InversionConfig, RunConfig, apply_overrides
from fedmitr.errors import ConfigError, excerpt

if TYPE_CHECKING:  # only for type checkers: importing these would import torch
    import torch

    from fedmitr.distill import GlobalModel, PoolTensors, TeacherCache
    from fedmitr.ensemble import Ensemble
    from fedmitr.inversion import SyntheticBatch
    from fedmitr.relabel import PatchScores, TokenTargets
    from fedmitr.server import MethodResult, ServerContext

# What a method is, for tables, charts and the default selections:
#   reference: not one model (the ensemble: K models at test time, the teacher);
#   baseline:  a global model from earlier work (FedAvg, dense inversion + KD);
#   ablation:  the method with one mechanism taken out, or a variant of it;
#   method:    FedMITR itself.
ROLES = ("reference", "baseline", "ablation", "method")
_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


@dataclass(frozen=True, kw_only=True)
class Method(ABC):
    """A server-side method: what it is called and looks like, and what it does with the clients."""

    name: str  # registry key, lower-case with dashes: "fedmitr"
    label: str  # display name: "FedMITR"
    colour: str  # one colour everywhere (bars, curves, tables): "#d1495b"
    role: str  # one of ROLES
    summary: str  # one line, shown in --help, the app and the README
    description: str = ""  # a few sentences for model cards (default: the summary)
    line: str = "solid"  # dash style when drawn as a horizontal reference line ("solid", "dash", "dot")

    synthesises: ClassVar[bool] = False  # makes synthetic images (rounds, a curve, a gallery)

    @property
    def makes_model(self) -> bool:
        """Whether the method ends with one global model (shareable, downloadable)."""
        return self.role != "reference"

    @property
    def sparse(self) -> bool:
        """Whether the method synthesises with sparse inversion (the benchmark's equal-time reruns)."""
        return False

    @property
    def relabel(self) -> bool:
        """Whether patch tokens get their own targets (the app's relabel map says so)."""
        return False

    @property
    def generative(self) -> bool:
        """Whether the method synthesises with a generator rather than by optimising pixels."""
        return False

    @abstractmethod
    def run(self, ctx: ServerContext) -> MethodResult:
        """Run on the trained clients of ``ctx``; ``seconds`` is filled in by the caller."""


# --- the registry ----------------------------------------------------------------------------------

METHODS: dict[str, Method] = {}
M = TypeVar("M", bound=Method)


def register_method(factory: Callable[[], M]) -> Callable[[], M]:
    """Decorator: register the method ``factory()`` returns under its name (as timm's
    ``@register_model``). Raises :class:`ConfigError` for a taken or malformed name."""
    method = factory()
    if not isinstance(method, Method):
        raise TypeError(f"{factory.__name__}() must return a fedmitr.methods.Method (got {type(method).__name__})")
    if not _NAME.match(method.name) or "@" in method.name:
        raise ConfigError(f"method name {excerpt(method.name)} must be lower-case letters, digits and dashes")
    if method.name in METHODS:
        raise ConfigError(f"a method named {excerpt(method.name)} is already registered")
    if method.role not in ROLES:
        raise ConfigError(f"method role must be one of {', '.join(ROLES)} (got {excerpt(method.role)})")
    METHODS[method.name] = method
    return factory


def get_method(name: str) -> Method:
    method = METHODS.get(name)
    if method is None:
        raise ConfigError(f"unknown method {excerpt(name)}; known: {', '.join(METHODS)}")
    return method


def headline() -> Method:
    """The method this project is about: the first registered method of role ``method``."""
    return next(m for m in METHODS.values() if m.role == "method")


def with_role(*roles: str) -> list[str]:
    """Names of the registered methods of the given roles, in registration order."""
    return [name for name, m in METHODS.items() if m.role in roles]


def check_config(cfg: RunConfig) -> RunConfig:
    """``cfg.validate()``, and its method names checked against the registry. Raises
    :class:`ConfigError`; returns ``cfg``. Every entry point that runs methods checks this way."""
    cfg.validate()
    if not cfg.methods:
        raise ConfigError(f"choose at least one method from: {', '.join(METHODS)}")
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(excerpt(m) for m in unknown[:3])}; "
                          f"known: {', '.join(METHODS)}")
    return cfg


def run_method(name: str, ctx: ServerContext) -> MethodResult:
    """Run one registered method by name on the trained clients of ``ctx``
    (:class:`fedmitr.server.ServerContext`); ``seconds`` is its wall-clock."""
    import time

    method = get_method(name)
    start = time.perf_counter()
    result = method.run(ctx)
    result.seconds = time.perf_counter() - start
    return result


def find_rounds(*, sparse: bool, relabel: bool, weighted: bool = False) -> str | None:
    """The first registered built-in-style :class:`Rounds` method with this inversion (model
    inversion, not a generator), these targets and, with ``weighted``, a learned teacher (how the
    benchmark pairs a method with its ablations, without naming them)."""
    for name, m in METHODS.items():
        if (m.synthesises and not getattr(m, "generative", False) and m.sparse == sparse and m.relabel == relabel
                and (getattr(m, "teacher", None) is not None) == weighted):
            return name
    return None


def parse_methods(text: str) -> tuple[str, ...]:
    """``"fedavg, ensemble"`` -> ``("fedavg", "ensemble")``; duplicates dropped, order kept."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    return tuple(dict.fromkeys(names))


# --- methods without synthesis ---------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class FedAvg(Method):
    """One-shot FedAvg: the clients' parameters averaged, weighted by client size."""

    def run(self, ctx: ServerContext) -> MethodResult:
        from fedmitr.baselines import fedavg
        from fedmitr.ensemble import Ensemble
        from fedmitr.server import MethodResult

        model = fedavg(ctx.ensemble.models, ctx.ensemble.num_samples)
        return MethodResult(self.name, Ensemble([model]).evaluate(ctx.dataset.test), model=model)


@dataclass(frozen=True, kw_only=True)
class EnsembleReference(Method):
    """The teacher itself: the clients' logits averaged, K models at test time."""

    def run(self, ctx: ServerContext) -> MethodResult:
        from fedmitr.server import MethodResult

        return MethodResult(self.name, ctx.ensemble.evaluate(ctx.dataset.test))


# --- the stages of the inversion family ------------------------------------------------------------

@dataclass(frozen=True)
class ModelInversion:
    """Stage 2: synthesise a batch of images from the ensemble (:func:`fedmitr.inversion.invert`).

    ``sparse``: stop the least-attended patches at ``cfg.stop_at`` and drop them from every later
    forward. ``fill``: what the stopped patches' pixels become (None: ``cfg.stopped_fill``; the
    run passes its value as ``fill_value``). A custom inversion stage takes the same arguments and
    returns a ``SyntheticBatch``.
    """

    sparse: bool
    fill: str | None = None
    word: ClassVar[str] = "inversion"  # what the progress line calls a synthesis step

    def iterations(self, cfg: RunConfig) -> int:
        """Optimisation steps per round (the progress bar's share of synthesis)."""
        return cfg.inversion.iterations

    def __call__(self, ensemble: Ensemble, labels: torch.Tensor, cfg: RunConfig, *,
                 pixel_bounds: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator,
                 allow_flip: bool = False, student: Any = None, fill_value: torch.Tensor | None = None,
                 on_step: Callable[[int, dict[str, float]], None] | None = None) -> SyntheticBatch:
        from fedmitr.inversion import invert

        return invert(ensemble, labels, cfg.inversion, pixel_bounds=pixel_bounds, sparse=self.sparse,
                      generator=generator, allow_flip=allow_flip, student=student, fill_value=fill_value,
                      on_step=on_step)


@dataclass(frozen=True)
class GeneratorSynthesis:
    """Stage 2 by a generator (:func:`fedmitr.generators.generate`): a conv generator trained against
    the ensemble each round, DENSE's way, or Co-Boosting's with ``hard`` (the hard-sample weight and
    the adversarial term on every image). Its images have no patch mask (``sparse`` is False)."""

    hard: bool = False
    sparse: ClassVar[bool] = False
    fill: ClassVar[str | None] = None
    word: ClassVar[str] = "generator"

    def iterations(self, cfg: RunConfig) -> int:
        return cfg.generator.iterations

    def __call__(self, ensemble: Ensemble, labels: torch.Tensor, cfg: RunConfig, *,
                 pixel_bounds: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator,
                 allow_flip: bool = False, student: Any = None, fill_value: torch.Tensor | None = None,
                 on_step: Callable[[int, dict[str, float]], None] | None = None) -> SyntheticBatch:
        from fedmitr.generators import generate

        return generate(ensemble, labels, cfg.generator, pixel_bounds=pixel_bounds, generator=generator,
                        student=student, hard=self.hard, on_step=on_step)


@dataclass(frozen=True)
class ClientWeighting:
    """A teacher stage (Co-Boosting's): after each round's synthesis, the ensemble's per-client
    weights learn from the pool (:func:`fedmitr.generators.learn_client_weights`), and the weighted
    ensemble teaches from then on."""

    def __call__(self, ensemble: Ensemble, images: torch.Tensor, labels: torch.Tensor, cfg: RunConfig, *,
                 round_index: int, generator: torch.Generator) -> Ensemble:
        from fedmitr.generators import learn_client_weights

        return learn_client_weights(ensemble, images, labels, cfg.generator, round_index=round_index,
                                    generator=generator)


@dataclass(frozen=True)
class ClassTargets:
    """Stage 3 without relabel: information density and H are scored (the app shows them), but
    only the class token is taught; patch tokens get no target."""

    relabel: ClassVar[bool] = False

    def __call__(self, ensemble: Ensemble, batch: SyntheticBatch, cfg: RunConfig, *, num_classes: int,
                 background: torch.Tensor | None = None,
                 on_chunk: Callable[[int, int], None] | None = None) -> tuple[PatchScores, TokenTargets | None]:
        from fedmitr.relabel import high_set_size, score_patches

        return score_patches(ensemble, batch, high_set_size(batch.stop_step.shape[1], cfg.relabel, cfg.inversion)), None


@dataclass(frozen=True)
class TokenRelabel:
    """Stage 3, token relabel: H keeps the generated label, the other patches get an ensemble
    relabel (:func:`fedmitr.relabel.relabel`). ``mode`` and ``high_ratio`` None follow
    ``cfg.relabel`` (whose own ``high_ratio`` None makes H the kept set); so does ``stopped``."""

    mode: str | None = None
    high_ratio: float | None = None
    stopped: str | None = None  # what a stopped patch teaches (None: cfg.relabel.stopped)
    relabel: ClassVar[bool] = True

    def __call__(self, ensemble: Ensemble, batch: SyntheticBatch, cfg: RunConfig, *, num_classes: int,
                 background: torch.Tensor | None = None,
                 on_chunk: Callable[[int, int], None] | None = None) -> tuple[PatchScores, TokenTargets | None]:
        from fedmitr.relabel import high_set_size, relabel, score_patches

        relabel_cfg = cfg.relabel
        if self.mode is not None:
            relabel_cfg = dataclasses.replace(relabel_cfg, mode=self.mode)
        if self.high_ratio is not None:
            relabel_cfg = dataclasses.replace(relabel_cfg, high_ratio=self.high_ratio)
        if self.stopped is not None:
            relabel_cfg = dataclasses.replace(relabel_cfg, stopped=self.stopped)
        scores = score_patches(ensemble, batch, high_set_size(batch.stop_step.shape[1], relabel_cfg, cfg.inversion))
        return scores, relabel(ensemble, batch, scores, relabel_cfg, num_classes=num_classes,
                               background=background, on_chunk=on_chunk)


@dataclass(frozen=True)
class Distillation:
    """Stage 4: one distillation step (:func:`fedmitr.distill.distill_step`) on the pool images
    ``idx``: T^2-KL of the class token from the ensemble on the same view, plus beta times the token
    loss where there are token targets. Returns the named losses. ``view``: what teacher and
    student see of a sparse image (None: ``cfg.distill.view``)."""

    view: str | None = None

    def __call__(self, student: GlobalModel, ensemble: Ensemble, pool: PoolTensors, idx: torch.Tensor, *,
                 optimizer: torch.optim.Optimizer, cfg: RunConfig, generator: torch.Generator,
                 allow_flip: bool = False, cache: TeacherCache | None = None,
                 before_step: Callable[[], None] | None = None) -> dict[str, float]:
        from fedmitr.distill import distill_step

        return distill_step(student, ensemble, pool, idx, optimizer=optimizer, cfg=cfg, generator=generator,
                            allow_flip=allow_flip, cache=cache, before_step=before_step)


@dataclass(frozen=True)
class HardSampleDistillation(Distillation):
    """Stage 4 on harder samples (Co-Boosting's): each batch's pixels first take
    ``generator.perturb_steps`` signed-gradient steps that raise the student's disagreement with the
    ensemble (:func:`fedmitr.generators.perturb`), then one distillation step learns from them (the
    teacher on the perturbed pixels, so no cached logits)."""

    def __call__(self, student: GlobalModel, ensemble: Ensemble, pool: PoolTensors, idx: torch.Tensor, *,
                 optimizer: torch.optim.Optimizer, cfg: RunConfig, generator: torch.Generator,
                 allow_flip: bool = False, cache: TeacherCache | None = None,
                 before_step: Callable[[], None] | None = None) -> dict[str, float]:
        import torch

        from fedmitr.distill import distill_step
        from fedmitr.generators import perturb

        batch = pool.batch(idx)
        if cfg.generator.perturb_steps > 0 and pool.pixel_bounds is not None:
            batch = dataclasses.replace(batch, images=perturb(student, ensemble, batch.images, cfg.generator,
                                                              pixel_bounds=pool.pixel_bounds))
        return distill_step(student, ensemble, batch, torch.arange(len(idx), device=idx.device), optimizer=optimizer,
                            cfg=cfg, generator=generator, allow_flip=allow_flip, cache=None, before_step=before_step)


@dataclass(frozen=True, kw_only=True)
class Rounds(Method):
    """Build one global ViT from synthetic images, in rounds of invert -> targets -> distil ->
    evaluate (:func:`fedmitr.server.run_rounds`)."""

    inversion: ModelInversion | GeneratorSynthesis = field(default_factory=lambda: ModelInversion(sparse=False))
    targets: ClassTargets | TokenRelabel = field(default_factory=ClassTargets)
    distillation: Distillation = field(default_factory=Distillation)
    teacher: ClientWeighting | None = None  # a stage that changes the ensemble after each round (None: fixed)
    # Nested config overrides this method always runs with, e.g. {"distill": {"vote": 0.0}}: a named
    # variant pins the values it stands for, whatever the run's defaults become.
    settings: Mapping[str, Any] = field(default_factory=dict)

    synthesises: ClassVar[bool] = True

    @property
    def sparse(self) -> bool:
        return self.inversion.sparse

    @property
    def relabel(self) -> bool:
        return self.targets.relabel

    @property
    def generative(self) -> bool:
        return isinstance(self.inversion, GeneratorSynthesis)

    def configure(self, cfg: RunConfig) -> RunConfig:
        """``cfg`` with the settings this method fixes put in: its ``settings`` (nested overrides,
        how a named variant pins its values), then its stages' (the fill, the view). Without token
        targets there is no vote and no MixToken (Token Labeling's, for an aux head that learned),
        and MixToken needs whole views."""
        if self.settings:
            cfg = apply_overrides(cfg, self.settings)
        if not self.relabel or (self.sparse and (self.distillation.view or cfg.distill.view) == "kept"):
            cfg = dataclasses.replace(cfg, distill=dataclasses.replace(
                cfg.distill, mixtoken=0.0, vote=cfg.distill.vote if self.relabel else 0.0))
        if self.inversion.fill is not None:
            cfg = dataclasses.replace(cfg, inversion=dataclasses.replace(cfg.inversion, stopped_fill=self.inversion.fill))
        if self.distillation.view is not None:
            cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, view=self.distillation.view))
        return cfg

    def run(self, ctx: ServerContext) -> MethodResult:
        from fedmitr.server import run_rounds

        return run_rounds(self, ctx)

    def describe(self, cfg: RunConfig, relabel: dict[str, Any] | None = None) -> str:
        """What this method did, in a few sentences, from the run's config and its relabel
        diagnostics (``metrics.json``'s ``relabel``): never a relabel the run did not make."""
        cfg = self.configure(cfg)
        if self.generative:
            return (f"It made this model with **{self.label}**: {self.description or self.summary} The global model "
                    f"learns from the generator's images through its class token alone.")
        if not self.sparse:
            made = "dense model inversion of the client ensemble (synthetic images optimised on every patch)"
        else:
            fill = cfg.inversion.stopped_fill
            named = {"background": "the data's background", "black": "black", "mean": "the data's mean pixel"}
            after = "then keep the noise they started from" if fill == "noise" else f"then are filled with {named[fill]}"
            made = (f"sparse model inversion of the client ensemble (synthetic images whose uninformative patches stop "
                    f"being optimised early and {after})")
        taught = (relabel or {}).get("taught") or {}
        high_ratio = getattr(self.targets, "high_ratio", None) or cfg.relabel.high_ratio
        if not self.relabel:
            targets = "the class token alone is taught (no patch targets)"
        elif relabel is None:  # before a run: what the settings ask for
            targets = ("a token loss that teaches every kept patch the generated label (H is the kept set: nothing is "
                       "relabelled)" if high_ratio is None or high_ratio >= 1 else
                       f"token relabel: the high-information patches (the top {high_ratio:.0%}) keep the generated "
                       f"label and the other kept patches are relabelled by the ensemble")
        elif taught.get("relabel", 0) > 0:
            targets = (f"token relabel: the high-information patches keep the generated label ({taught['label']:.0%} of "
                       f"all patches) and the other kept patches are relabelled by the ensemble "
                       f"({taught['relabel']:.0%})")
        else:
            targets = ("a token loss that teaches every kept patch the generated label: no patch was relabelled in this "
                       "run, because the high-information set H held every kept patch")
        r, k = cfg.relabel, cfg.distill
        taught_background = (taught.get("background", 0) > 0 if relabel is not None
                             else r.stopped != "ignore" and r.stopped_weight > 0)
        if self.relabel and self.sparse and taught_background:
            what = {"blank": "the ensemble's label of the background", "uniform": "every class alike",
                    "image": "their own image's soft label"}[r.stopped]
            weight = f" (at weight {r.stopped_weight:g})" if r.stopped_weight != 1 else ""
            targets += f"; the stopped patches are taught {what}{weight}"
        elif self.relabel and self.sparse:
            targets += "; the stopped patches teach nothing"
        if self.relabel and k.aux_detach:
            targets += ("; the token targets train an aux head on stop-gradient patch features, so they do not move "
                        "the shared backbone")
        sees = ("whole images, every patch, as a real test image is seen"
                if not self.sparse or k.view == "whole" else "only the patches inversion kept")
        if self.relabel and k.mixtoken > 0:
            sees += (f", with MixToken on {k.mixtoken:.0%} of the steps (a box of patches swapped between two images, "
                     f"each patch keeping its own target)")
        if self.teacher is not None:
            targets += ("; the client ensemble teaches with per-client weights learned each round from the synthetic "
                        "pool (Co-Boosting's weighting)")
        predicts = (f" It predicts with Token Labeling's vote: the class token's logits plus {k.vote:g} × the aux "
                    f"head's largest logit over the patch tokens." if self.relabel and k.vote else "")
        return (f"It made this model with **{self.label}**: {made}; {targets}; and distillation into one ViT that sees "
                f"{sees}.{predicts}")


# --- the built-in methods --------------------------------------------------------------------------

@register_method
def fedavg() -> Method:
    return FedAvg(name="fedavg", label="FedAvg", colour="#8d8d8d", role="baseline", line="dash",
                  summary="one-shot parameter average of the client models (weighted by client size)")


@register_method
def ensemble() -> Method:
    return EnsembleReference(name="ensemble", label="ensemble (teacher)", colour="#2b2d42", role="reference",
                             line="dot",
                             summary="the teacher itself: K models at inference, averaged logits (a reference)")


@register_method
def dense_kd() -> Method:
    return Rounds(name="dense-kd", label="dense inversion + KD", colour="#30638e", role="baseline",
                  summary="dense inversion + class-token KD (F-ADI / FedDF-style data-free baseline)",
                  inversion=ModelInversion(sparse=False), targets=ClassTargets())


@register_method
def sparse_kd() -> Method:
    return Rounds(name="sparse-kd", label="sparse inversion + KD", colour="#edae49", role="ablation",
                  summary="sparse inversion + class-token KD (ablation: no token relabel)",
                  inversion=ModelInversion(sparse=True), targets=ClassTargets())


@register_method
def dense_relabel() -> Method:
    return Rounds(name="dense-relabel", label="dense inversion + relabel", colour="#00798c", role="ablation",
                  summary="dense inversion + token relabel (ablation: no sparsity)",
                  inversion=ModelInversion(sparse=False), targets=TokenRelabel())


@register_method
def fedmitr() -> Method:
    # The ensemble teaches with Co-Boosting's learned per-client weights (chosen on validation,
    # docs/results.md); the teacher's cache keeps the clients apart, so it serves the moving weights.
    return Rounds(name="fedmitr", label="FedMITR", colour="#d1495b", role="method",
                  summary="sparse inversion + token relabel + distillation from a learned client weighting (the method)",
                  inversion=ModelInversion(sparse=True), targets=TokenRelabel(), teacher=ClientWeighting())


@register_method
def fedmitr_unweighted() -> Method:
    # The weights' ablation, and the default before them: every client's vote counts alike.
    return Rounds(name="fedmitr-unweighted", label="FedMITR, equal client weights", colour="#9c6644",
                  role="ablation", summary="FedMITR taught by the plain ensemble, every client alike (ablation: no "
                                           "learned client weights)",
                  inversion=ModelInversion(sparse=True), targets=TokenRelabel())


@register_method
def fedmitr_noise() -> Method:
    # The fill's ablation: the stopped patches keep their noise, and the whole view shows it.
    return Rounds(name="fedmitr-noise", label="FedMITR, stopped = noise", colour="#f4a259", role="ablation",
                  summary="FedMITR with the stopped patches left as noise (ablation: no background fill)",
                  inversion=ModelInversion(sparse=True, fill="noise"), targets=TokenRelabel())


@register_method
def fedmitr_kept() -> Method:
    # The view's ablation: teacher and student see only the kept patches, so the stopped ones (never
    # seen) teach nothing.
    return Rounds(name="fedmitr-kept", label="FedMITR, kept view", colour="#5b8e7d", role="ablation",
                  summary="FedMITR distilled on the kept patches only (ablation: no whole-image view)",
                  inversion=ModelInversion(sparse=True), targets=TokenRelabel(stopped="ignore"),
                  distillation=Distillation(view="kept"))


@register_method
def fedmitr_keptview() -> Method:
    # The earlier default, kept by name: stopped patches left as noise, distillation on the kept
    # view, H = the kept set (high_ratio 1 caps H at the kept patches), so nothing is relabelled, and
    # the stopped patches teach nothing.
    return Rounds(name="fedmitr-keptview", label="FedMITR (earlier default)", colour="#9e2a2b", role="ablation",
                  summary="the earlier default: noise in stopped patches, kept view, H = the kept set (no relabel)",
                  inversion=ModelInversion(sparse=True, fill="noise"),
                  targets=TokenRelabel(high_ratio=1.0, stopped="ignore"), distillation=Distillation(view="kept"),
                  settings={"distill": {"aux_detach": False}})


# --- the relabel's variants, by name (docs/results.md, "What the patch tokens learned") -------------

# The default before the patch tokens were taught classes (v5), pinned whatever the defaults become:
# H = top 20%, the 3x3 neighbourhood relabel, stopped patches taught the background's label, the aux
# head on the shared backbone, the class token alone at test time, no MixToken.
V5_SETTINGS: dict[str, dict[str, Any]] = {
    "relabel": {"mode": "neighbourhood", "high_ratio": 0.2, "stopped": "blank", "stopped_weight": 1.0},
    "distill": {"token_weight": 0.5, "aux_detach": False, "vote": 0.0, "mixtoken": 0.0},
}
VARIANT_VOTE = 0.5  # the vote alone on v5's targets: LV-ViT's lambda
VARIANT_MIXTOKEN = 0.5  # MixToken alone on v5's targets: half the steps mixed


def _v5_with(**distill: Any) -> dict[str, dict[str, Any]]:
    return {"relabel": dict(V5_SETTINGS["relabel"]), "distill": {**V5_SETTINGS["distill"], **distill}}


@register_method
def fedmitr_v5() -> Method:
    return Rounds(name="fedmitr-v5", label="FedMITR v5 (earlier default)", colour="#6a040f", role="ablation",
                  summary="the earlier default: 3x3 relabel, stopped patches taught the background, class token alone",
                  inversion=ModelInversion(sparse=True), targets=TokenRelabel(), settings=V5_SETTINGS)


@register_method
def fedmitr_targets() -> Method:
    return Rounds(name="fedmitr-targets", label="FedMITR, targets alone", colour="#ff7f51", role="ablation",
                  summary="today's token targets alone: no vote at test time, no MixToken",
                  inversion=ModelInversion(sparse=True), targets=TokenRelabel(),
                  settings={"distill": {"vote": 0.0, "mixtoken": 0.0}})


@register_method
def fedmitr_vote() -> Method:
    return Rounds(name="fedmitr-vote", label="FedMITR v5 + vote", colour="#7b2cbf", role="ablation",
                  summary=f"v5's targets, predicting with Token Labeling's vote (lambda {VARIANT_VOTE:g})",
                  inversion=ModelInversion(sparse=True), targets=TokenRelabel(), settings=_v5_with(vote=VARIANT_VOTE))


@register_method
def fedmitr_mixtoken() -> Method:
    return Rounds(name="fedmitr-mixtoken", label="FedMITR v5 + MixToken", colour="#3a86ff", role="ablation",
                  summary=f"v5's targets, distilled with MixToken (p {VARIANT_MIXTOKEN:g})",
                  inversion=ModelInversion(sparse=True), targets=TokenRelabel(),
                  settings=_v5_with(mixtoken=VARIANT_MIXTOKEN))


# --- the paper's generator baselines (fedmitr.generators) ----------------------------------------------

@register_method
def dense_gen() -> Method:
    return Rounds(name="dense-gen", label="DENSE (generator)", colour="#588157", role="baseline",
                  summary="DENSE: a conv generator trained against the ensemble each round, then KD (baseline)",
                  description="DENSE (Zhang et al., NeurIPS 2022): each round a small conv generator is trained so "
                              "that the client ensemble predicts the sampled labels on its images while the global "
                              "model disagrees with the ensemble; the global model is distilled on the pool of its "
                              "images.",
                  inversion=GeneratorSynthesis(hard=False), targets=ClassTargets())


@register_method
def co_boosting() -> Method:
    # The ensemble's weights change every round, so the teacher's logits cannot be cached.
    return Rounds(name="co-boosting", label="Co-Boosting", colour="#bc6c25", role="baseline",
                  summary="Co-Boosting: hard-sample generator, a learned ensemble weighting and perturbed samples, "
                          "then KD (baseline)",
                  description="Co-Boosting (Dai et al., ICLR 2024): each round a conv generator is trained on "
                              "hard-sample-weighted cross-entropy against the ensemble plus an adversarial term; the "
                              "ensemble's per-client weights then learn from the pool of images and teach from then "
                              "on; the global model is distilled on perturbed, harder versions of the pool's images.",
                  inversion=GeneratorSynthesis(hard=True), targets=ClassTargets(), teacher=ClientWeighting(),
                  distillation=HardSampleDistillation(), settings={"distill": {"teacher_cache": False}})
