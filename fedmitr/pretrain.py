"""A backbone pretrained on drawn images: formula-driven supervised pretraining, offline.

FedMITR's paper starts its clients from ImageNet-pretrained DeiTs, whose patch tokens carry local
meaning. There is no Hub here, so the nearest honest equivalent is a backbone pretrained on images
a program draws: fractals of iterated function systems (IFS), as FractalDB does (Kataoka et al.,
ACCV 2020; for ViTs, Nakashima et al., AAAI 2022; for federated clients, Chen et al., ICLR 2023).

* **Classes.** Each class is one random IFS: 2 to 4 contractive affine maps, kept when its
  fractal fills a sensible share of the canvas (neither a dot nor a blob).
* **Instances.** Every instance jitters the class's maps a little and draws the fractal by the
  chaos game, at a random scale, rotation, mirror and place, in strokes of grey on black.
* **Targets.** The class token learns the class; every patch token learns the class where the
  fractal has ink in the patch and a separate *background* class elsewhere, through the same
  head. So the backbone's patch tokens are trained to say what they show, which is what the
  token relabel reads from the clients.

:func:`pretrain` trains the scratch ViT of a :class:`~fedmitr.config.ModelConfig` and returns its
backbone (everything but the head) with a record of how it was made; :func:`save_backbone` writes
it as safetensors with that record, and ``model.init`` loads it into the clients' shared start
(:func:`load_backbone`). The checkpoints for the ``cpu`` and ``cpu-49`` architectures ship in
``fedmitr/bundled/pretrained/``, made by ``fedmitr pretrain`` (README).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from fedmitr.config import ModelConfig
from fedmitr.errors import ConfigError, excerpt
from fedmitr.training import foreground, warmup_cosine

PRETRAINED_DIR = Path(__file__).resolve().parent / "bundled" / "pretrained"
BACKBONE_NAMES = ("fractal",)  # model.init names that mean "the bundled checkpoint of this architecture"


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    classes: int = 100  # fractal classes, one random IFS each
    instances: int = 60  # drawn images per class
    epochs: int = 30  # passes over the drawn set
    batch_size: int = 128  # images per step
    lr: float = 2e-3  # AdamW peak learning rate (warm-up, then cosine)
    weight_decay: float = 0.05  # AdamW weight decay
    token_weight: float = 1.0  # weight of the per-patch loss next to the class token's
    shift_px: int = 2  # random translation while training, in pixels
    seed: int = 0  # the fractals and the training

    def validate(self) -> "PretrainConfig":
        if self.classes < 2 or self.instances < 1 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"pretraining needs classes >= 2, instances >= 1, epochs >= 1, batch_size >= 1 and "
                              f"lr > 0 (got {self.classes}, {self.instances}, {self.epochs}, {self.batch_size}, "
                              f"{self.lr})")
        return self


# --- drawing fractals ---------------------------------------------------------------------------------

def random_system(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One IFS: ``A`` [n, 2, 2] contractive linear parts, ``b`` [n, 2] offsets, ``p`` [n] map
    probabilities (proportional to |det A|, as the chaos game needs to fill the attractor evenly)."""
    n = int(rng.integers(2, 5))
    while True:
        a = rng.uniform(-1, 1, (n, 2, 2))
        sv = np.linalg.svd(a, compute_uv=False)
        if sv.max() < 0.95 and sv.min() > 0.08:
            break
    b = rng.uniform(-1, 1, (n, 2))
    det = np.abs(np.linalg.det(a)) + 1e-3
    return a, b, det / det.sum()


def chaos_points(a: np.ndarray, b: np.ndarray, p: np.ndarray, rng: np.random.Generator, *, images: int,
                 chains: int = 400, steps: int = 24, burn_in: int = 8) -> np.ndarray:
    """``[images, chains * (steps - burn_in), 2]`` points of the attractor, by the chaos game run on
    many chains at once (a contractive system forgets its start within a few steps)."""
    x = rng.uniform(-1, 1, (images, chains, 2))
    out = []
    for step in range(steps):
        choice = rng.choice(len(p), size=(images, chains), p=p)
        x = np.einsum("icjk,ick->icj", a[choice], x) + b[choice]
        if step >= burn_in:
            out.append(x)
    return np.concatenate(out, axis=1)


def draw(points: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Points ``[I, P, 2]`` -> ``[I, size, size]`` float images in [0, 1]: each fractal fitted into
    the canvas at a random scale, rotation, mirror and place, its density drawn as grey strokes."""
    images, fine = points.shape[0], 2 * size
    angle = rng.uniform(0, 2 * math.pi, images)
    rot = np.stack([np.stack([np.cos(angle), -np.sin(angle)], -1), np.stack([np.sin(angle), np.cos(angle)], -1)], -2)
    pts = np.einsum("ijk,ipk->ipj", rot, points - points.mean(1, keepdims=True))
    pts[:, :, 0] *= np.where(rng.random(images) < 0.5, -1, 1)[:, None]
    lo, hi = np.percentile(pts, 1, axis=1), np.percentile(pts, 99, axis=1)  # [I, 2], robust to stray points
    span = (hi - lo).max(1).clip(1e-6)  # [I]
    scale = rng.uniform(0.55, 0.95, images) * (fine - 1) / span
    extent = (hi - lo) * scale[:, None]
    offset = rng.uniform(0, 1, (images, 2)) * (fine - 1 - extent).clip(0)
    pix = ((pts - lo[:, None]) * scale[:, None, None] + offset[:, None]).round().astype(int)
    inside = (pix >= 0).all(-1) & (pix < fine).all(-1)
    canvas = np.zeros((images, fine * fine))
    flat = pix[..., 1] * fine + pix[..., 0]
    for i in range(images):
        canvas[i] = np.bincount(flat[i][inside[i]], minlength=fine * fine)
    canvas = canvas.reshape(images, size, 2, size, 2).mean((2, 4))  # anti-aliased down to size
    density = canvas / (np.percentile(canvas, 99, axis=(1, 2), keepdims=True) + 1e-6)
    return (1 - np.exp(-2.5 * density)).clip(0, 1)  # ink: saturates like a pen stroke


def fractal_set(cfg: PretrainConfig, size: int, on_progress: Callable[[int, int], None] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """``cfg.classes * cfg.instances`` drawn images ``[N, size, size]`` float32 and their classes ``[N]``."""
    rng = np.random.default_rng(cfg.seed)
    images, labels = [], []
    c = 0
    while c < cfg.classes:
        a, b, p = random_system(rng)
        probe = draw(chaos_points(a, b, p, rng, images=4), rng, size)
        fill = float((probe > 0.3).mean())
        if not 0.05 <= fill <= 0.45:  # a dot or a blob: not a shape to learn
            continue
        jitter_a = a[None] * (1 + rng.normal(0, 0.06, (cfg.instances, *a.shape)))
        jitter_b = b[None] + rng.normal(0, 0.06, (cfg.instances, *b.shape))
        pts = np.stack([chaos_points(jitter_a[i], jitter_b[i], p, rng, images=1)[0] for i in range(cfg.instances)])
        images.append(draw(pts, rng, size).astype(np.float32))
        labels.append(np.full(cfg.instances, c))
        c += 1
        if on_progress is not None:
            on_progress(c, cfg.classes)
    return np.concatenate(images), np.concatenate(labels)


# --- training -----------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class Backbone:
    """A pretrained backbone: the ViT's weights but the head, and how they were made."""

    state: dict[str, torch.Tensor]
    record: dict[str, Any]  # architecture, recipe, seconds, accuracies


def architecture(model_cfg: ModelConfig, image_size: int, channels: int) -> dict[str, Any]:
    """What a checkpoint must match to be loaded into a model (a scratch ViT's shape)."""
    img = model_cfg.img_size or image_size
    return {"img_size": img, "patch_size": img // model_cfg.patch_grid, "in_chans": channels,
            "embed_dim": model_cfg.embed_dim, "depth": model_cfg.depth, "num_heads": model_cfg.num_heads,
            "mlp_ratio": model_cfg.mlp_ratio}


def pretrain(model_cfg: ModelConfig, cfg: PretrainConfig, *, image_size: int = 28, channels: int = 1,
             on_progress: Callable[[str, int, int], None] | None = None) -> Backbone:
    """Draw the fractal set, train the scratch ViT of ``model_cfg`` on it, return its backbone."""
    from fedmitr.models import apply_shifts, build_model, sample_shifts, shift_patch_maps, sparse_forward

    if model_cfg.arch != "scratch":
        raise ConfigError(f"pretraining makes backbones for the scratch ViT, not {excerpt(model_cfg.arch)}")
    cfg.validate()
    t0 = time.perf_counter()
    arch = architecture(model_cfg, image_size, channels)
    unit, labels = fractal_set(cfg, arch["img_size"], on_progress=lambda i, n: on_progress and on_progress("draw", i, n))
    draw_seconds = time.perf_counter() - t0
    x = torch.from_numpy(unit).unsqueeze(1).repeat(1, channels, 1, 1)  # [N, C, S, S]
    mean, std = x.mean().item(), x.std().item()
    held = np.random.default_rng(cfg.seed + 1).random(len(labels)) < 0.1  # 10% to measure on
    train_idx, test_idx = torch.from_numpy(np.flatnonzero(~held)), torch.from_numpy(np.flatnonzero(held))
    y = torch.from_numpy(labels).long()
    patch = arch["patch_size"]
    fg = foreground(x, patch)  # [N, P]: the patches with ink
    xn = (x - mean) / std

    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = build_model(model_cfg, cfg.classes + 1, channels, arch["img_size"])  # + the background class
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train_idx) // cfg.batch_size)
    scheduler = warmup_cosine(optimizer, cfg.epochs * steps_per_epoch, 0.1)
    t1 = time.perf_counter()
    model.train()
    for epoch in range(cfg.epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=generator)]
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            # The same shift moves the image and its patch targets: a view patch is ink where most
            # of its pixels came from ink patches.
            shifts = sample_shifts(len(idx), cfg.shift_px, generator)
            view = apply_shifts(xn[idx], shifts)
            ink = shift_patch_maps(fg[idx].float().unsqueeze(1), shifts, patch)[:, 0] >= 0.5
            tok = torch.where(ink, y[idx].unsqueeze(1), torch.full_like(ink, cfg.classes, dtype=torch.long))
            out = sparse_forward(model, view)
            loss = F.cross_entropy(out.logits, y[idx])
            token_logits = model.head(out.tokens)
            loss = loss + cfg.token_weight * F.cross_entropy(token_logits.flatten(0, 1), tok.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step_update(epoch * steps_per_epoch + s + 1)
        if on_progress is not None:
            on_progress("train", epoch + 1, cfg.epochs)
    train_seconds = time.perf_counter() - t1
    model.eval()
    with torch.no_grad():
        out = sparse_forward(model, xn[test_idx])
        image_acc = float((out.logits.argmax(1) == y[test_idx]).float().mean())
        tok_pred = model.head(out.tokens).argmax(-1)
        fg_test = fg[test_idx]
        patch_acc = float((tok_pred[fg_test] == y[test_idx].unsqueeze(1).expand_as(fg_test)[fg_test]).float().mean())
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    record = {"kind": "fractal", "architecture": arch, "recipe": asdict(cfg), "input_mean": mean, "input_std": std,
              "draw_seconds": round(draw_seconds, 1), "train_seconds": round(train_seconds, 1),
              "threads": torch.get_num_threads(), "held_out_image_accuracy": round(image_acc, 4),
              "held_out_patch_accuracy": round(patch_acc, 4), "images": int(len(labels))}
    return Backbone(state=state, record=record)


# --- files ---------------------------------------------------------------------------------------------

def checkpoint_name(arch: dict[str, Any]) -> str:
    return (f"fractal-{arch['img_size']}px-p{arch['patch_size']}-d{arch['embed_dim']}x{arch['depth']}"
            f"-h{arch['num_heads']}-c{arch['in_chans']}.safetensors")


def save_backbone(backbone: Backbone, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / checkpoint_name(backbone.record["architecture"])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in backbone.state.items()}, str(path),
              metadata={"fedmitr": json.dumps(backbone.record)})
    return path


def read_backbone(path: str | Path) -> Backbone:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no pretrained backbone at {excerpt(str(path), 80)}; make one with `fedmitr pretrain`")
    with safe_open(str(path), framework="pt") as fh:
        record = json.loads((fh.metadata() or {}).get("fedmitr", "{}"))
    return Backbone(state=load_file(str(path)), record=record)


def resolve_init(init: str, model_cfg: ModelConfig, image_size: int, channels: int) -> Path:
    """The checkpoint ``model.init`` names: a bundled backbone of this architecture, or a file."""
    if init in BACKBONE_NAMES:
        if model_cfg.arch != "scratch":
            raise ConfigError(f"model.init={init!r} is for the scratch ViT; {excerpt(model_cfg.arch)} has its own "
                              f"weights (model.pretrained)")
        path = PRETRAINED_DIR / checkpoint_name(architecture(model_cfg, image_size, channels))
        if not path.is_file():
            have = ", ".join(sorted(p.name for p in PRETRAINED_DIR.glob("*.safetensors"))) or "none"
            raise ConfigError(f"no bundled {init} backbone for this architecture ({path.name}); bundled: {have}. "
                              f"Make one with `fedmitr pretrain` and set model.init to its path")
        return path
    return Path(init)


def load_backbone(model: VisionTransformer, init: str, model_cfg: ModelConfig, *, image_size: int,
                  channels: int) -> dict[str, Any]:
    """Load the backbone ``init`` names into ``model`` (its head stays as it is); return its record."""
    backbone = read_backbone(resolve_init(init, model_cfg, image_size, channels))
    want = architecture(model_cfg, image_size, channels) if model_cfg.arch == "scratch" else None
    have = backbone.record.get("architecture")
    if want is not None and have is not None and have != want:
        raise ConfigError(f"the backbone {excerpt(init, 80)} was made for {have}, not this model's {want}; "
                          f"make one for this architecture with `fedmitr pretrain`")
    missing, unexpected = model.load_state_dict(backbone.state, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise ConfigError(f"the backbone {excerpt(init, 80)} does not fit this model (missing "
                          f"{[k for k in missing if not k.startswith('head.')][:3]}, unexpected {unexpected[:3]})")
    return backbone.record
