"""ViT factory (timm ``VisionTransformer``) and the sparse forward used by inversion and distillation.

``sparse_forward(model, images, keep_idx)`` runs a timm ViT on CLS plus a subset of patch tokens. It
uses only timm's public modules (patch_embed, pos_embed, blocks, norm, head) and computes the last
block's attention weights the way timm itself exposes them (``timm.utils.AttentionExtract``:
unfused attention and a forward hook on ``attn_drop``), so timm is never patched.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from fedmitr.config import ModelConfig
from fedmitr.errors import ConfigError, ModelUnavailable, excerpt, redact


def build_model(cfg: ModelConfig, num_classes: int, in_chans: int, image_size: int) -> VisionTransformer:
    """A fresh client/global model for a dataset with ``image_size`` px, ``in_chans`` channels."""
    if cfg.arch == "scratch":
        img_size = cfg.img_size or image_size
        if img_size % cfg.patch_grid:
            raise ConfigError(
                f"image size {img_size} px is not divisible by patch_grid {cfg.patch_grid}; "
                f"choose a patch_grid that divides it, or set model.img_size"
            )
        return VisionTransformer(
            img_size=img_size,
            patch_size=img_size // cfg.patch_grid,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            global_pool="token",
            class_token=True,
        )
    import timm

    try:
        model = timm.create_model(cfg.arch, pretrained=cfg.pretrained, num_classes=num_classes,
                                  in_chans=in_chans, img_size=cfg.img_size or 224)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"unknown timm model {excerpt(cfg.arch)}; use 'scratch' or a name from timm.list_models()") from None
        raise ModelUnavailable(f"cannot load pretrained weights for {excerpt(cfg.arch)}: {_first_line(err)}. Offline? "
                               f"Use the 'cpu' or 'tiny' preset, which train from scratch.") from None
    except Exception as err:  # noqa: BLE001 - network/Hub failures come in many types
        raise ModelUnavailable(f"cannot load pretrained weights for {excerpt(cfg.arch)}: {type(err).__name__}: "
                               f"{_first_line(err)}. Offline? Use the 'cpu' "
                               f"or 'tiny' preset, which train from scratch.") from None
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"{excerpt(cfg.arch)} is not a timm VisionTransformer; FedMITR needs one")
    return model


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return redact(lines[0].rstrip("."))[:200] if lines else ""


def model_input_size(model: VisionTransformer) -> int:
    return int(model.patch_embed.img_size[0])


def patch_grid(model: VisionTransformer) -> int:
    return int(model.patch_embed.grid_size[0])


def fit_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[B, C, H, W]`` to the model's input size if it differs (pretrained presets)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


@dataclass
class SparseOutput:
    logits: torch.Tensor  # [B, num_classes], from the class token
    cls_attention: torch.Tensor  # [B, M], last block's CLS->patch attention, mean over heads
    tokens: torch.Tensor  # [B, M, D], final (normed) patch tokens, in keep_idx order


def patchify(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, N, C*p*p]`` pixel patches in the order of timm's patch embedding."""
    p = model.patch_embed.patch_size
    return F.unfold(images, kernel_size=p, stride=p).transpose(1, 2)


def embed_patches(model: VisionTransformer, patches: torch.Tensor) -> torch.Tensor:
    """timm's patch embedding (a strided conv) as a matmul on ``[B, M, C*p*p]`` pixel patches.

    Equivalent to ``model.patch_embed`` on the full image, but only for the patches given, so the
    forward *and* the backward to the pixels skip stopped patches.
    """
    proj = model.patch_embed.proj
    x = F.linear(patches, proj.weight.flatten(1), proj.bias)
    return model.patch_embed.norm(x)


def sparse_forward(model: VisionTransformer, images: torch.Tensor, keep_idx: torch.Tensor | None = None,
                   patches: torch.Tensor | None = None) -> SparseOutput:
    """Run ``model`` on CLS plus the patches ``keep_idx`` ([B, M] indices into the N patches).

    Stopped patches are removed before the patch embedding, so the embedding and every block run on
    1 + M tokens: that is where sparse inversion's speed-up comes from. ``keep_idx=None`` is the
    dense forward and matches ``model(images)``. ``patches`` ([B, M, C*p*p], from :func:`patchify`
    and already gathered with ``keep_idx``) lets an ensemble share that work across models.
    """
    if model.reg_token is not None or model.dynamic_img_size or model.cls_token is None:
        raise ConfigError("sparse_forward supports timm ViTs with a class token, no register tokens and a fixed image size")
    if keep_idx is None:
        x = model.patch_embed(images)  # [B, N, D]
    else:
        if patches is None:
            patches = gather_tokens(patchify(model, images), keep_idx)
        x = embed_patches(model, patches)  # [B, M, D]
    b = x.shape[0]
    if model.no_embed_class:
        pos, cls = model.pos_embed, model.cls_token
    else:
        pos, cls = model.pos_embed[:, 1:], model.cls_token + model.pos_embed[:, :1]
    pos = pos.expand(b, -1, -1)
    x = x + (pos if keep_idx is None else gather_tokens(pos, keep_idx))
    x = torch.cat([cls.expand(b, -1, -1), x], dim=1)
    x = model.norm_pre(model.patch_drop(model.pos_drop(x)))
    for blk in model.blocks[:-1]:
        x = blk(x)
    with attention_weights(model.blocks[-1]) as captured:
        x = model.blocks[-1](x)
    attn = captured[-1]  # [B, heads, 1 + M, 1 + M]
    x = model.norm(x)
    logits = model.forward_head(x)
    return SparseOutput(logits=logits, cls_attention=attn[:, :, 0, 1:].mean(dim=1), tokens=x[:, 1:])


def gather_tokens(tokens: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """``[B, N, D]`` tokens at ``keep_idx`` [B, M] -> ``[B, M, D]``."""
    return torch.gather(tokens, 1, keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


@contextmanager
def attention_weights(block: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the attention weights ``[B, heads, n, n]`` of a timm ``Block`` while the context is open.

    timm's fused attention hides the weights; its own extraction route (``timm.utils.AttentionExtract``
    with hooks) is the unfused path plus a forward hook on ``attn_drop``, whose output is the softmax
    weights (dropout is off in eval and p=0 here). Only this block is switched, only for the context:
    every other forward keeps timm's fused kernel.
    """
    attn = block.attn
    captured: list[torch.Tensor] = []
    handle = attn.attn_drop.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        yield captured
    finally:
        attn.fused_attn = fused
        handle.remove()


def token_logits(model: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Per-patch class logits ``[B, M, L]``: the classifier head applied to each final patch token.

    This is Token Labeling's annotator: each client's own head on its own (already normed) tokens.
    """
    return model.head(model.fc_norm(tokens))


@torch.no_grad()
def vote_logits(model: VisionTransformer, aux_head: nn.Linear, images: torch.Tensor, vote: float,
                batch_size: int = 500) -> torch.Tensor:
    """Token Labeling's prediction ``head(cls) + vote * max_i aux_head(z_i)`` on real images, ``[N, L]``
    on the CPU: the class token's logits plus ``vote`` times, for each class, its largest logit
    over the patch tokens ``z_i`` (resized to the model's input size if needed)."""
    device, size = next(model.parameters()).device, model_input_size(model)
    aux_head = aux_head.to(device)
    out = []
    for start in range(0, images.shape[0], batch_size):
        features = model.forward_features(fit_input(images[start:start + batch_size].to(device), size))
        logits = model.forward_head(features).float()
        if vote:
            logits = logits + vote * aux_head(features[:, model.num_prefix_tokens:]).float().max(1).values
        out.append(logits.cpu())
    return torch.cat(out)


# --- augmentation on batches, and patch maps that move with it -------------------------------------

@dataclass
class Shifts:
    """One random translation (and flip) per image: ``dy``/``dx`` in 0..2*max_shift (an offset of
    ``d - max_shift`` px), ``flip`` [B] bool or None. The same draw moves images and patch maps."""

    dy: torch.Tensor | None  # [B] long, or None when there is no shift
    dx: torch.Tensor | None  # [B] long
    flip: torch.Tensor | None  # [B] bool, or None when there is no flip
    max_shift: int


def sample_shifts(b: int, max_shift: int, generator: torch.Generator | None = None, flip: bool = False,
                  device: torch.device | str = "cpu") -> Shifts:
    """Draw ``b`` shifts of up to ``max_shift`` px (and flips): dy, then dx, then the flips."""
    dy = dx = flips = None
    if max_shift > 0:
        dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator).to(device)
        dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator).to(device)
    if flip:
        flips = (torch.rand(b, generator=generator) < 0.5).to(device)
    return Shifts(dy, dx, flips, max_shift)


def apply_shifts(images: torch.Tensor, shifts: Shifts) -> torch.Tensor:
    """Translate each ``[B, C, H, W]`` image by its shift (edge-replicated), then flip it if drawn.

    One gather, no Python loop over the batch.
    """
    b, _, h, w = images.shape
    dev = images.device
    s = shifts.max_shift
    if shifts.dy is not None:
        padded = F.pad(images, (s,) * 4, mode="replicate")
        rows = (torch.arange(h, device=dev).unsqueeze(0) + shifts.dy.to(dev).unsqueeze(1))  # [B, H]
        cols = (torch.arange(w, device=dev).unsqueeze(0) + shifts.dx.to(dev).unsqueeze(1))  # [B, W]
        batch = torch.arange(b, device=dev).view(b, 1, 1)
        images = padded.permute(0, 2, 3, 1)[batch, rows.unsqueeze(2), cols.unsqueeze(1)].permute(0, 3, 1, 2)
    if shifts.flip is not None:
        images = torch.where(shifts.flip.to(dev).view(b, 1, 1, 1), images.flip(-1), images)
    return images.contiguous()


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None,
                 flip: bool = False) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` px (edge-replicated), optionally flip it."""
    if max_shift <= 0 and not flip:
        return images
    return apply_shifts(images, sample_shifts(images.shape[0], max_shift, generator, flip=flip))


def shift_patch_maps(maps: torch.Tensor, shifts: Shifts, patch: int) -> torch.Tensor:
    """Move per-patch values ``[B, K, N]`` (N = G*G patches) with the images' shifts and flips.

    Each patch's value is spread over its pixels, the pixels move exactly as :func:`apply_shifts`
    moves the image, and each patch of the view averages what landed on it: a view patch made of
    70% of patch a and 30% of patch b gets 0.7 a + 0.3 b (Token Labeling moves its label maps with
    the crop in the same way). With no shift and no flip the maps come back unchanged.
    """
    if shifts.dy is None and shifts.flip is None:
        return maps
    b, k, n = maps.shape
    g = int(round(n ** 0.5))
    pixels = maps.view(b, k, g, g).repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
    moved = apply_shifts(pixels, shifts)
    return F.avg_pool2d(moved, patch).view(b, k, n)


def view_keep_idx(keep_mask: torch.Tensor, shifts: Shifts, patch: int, kept: int) -> torch.Tensor:
    """The ``kept`` patches of each shifted view that hold the most of the kept patches' pixels
    (``keep_mask`` [B, N] bool: the patches inversion kept), sorted: ``[B, kept]``."""
    share = shift_patch_maps(keep_mask.float().unsqueeze(1), shifts, patch)[:, 0]  # [B, N] in [0, 1]
    # Ties (equal shares) go to the lower index, so an unshifted view keeps exactly the same patches.
    order = torch.argsort(-share, dim=1, stable=True)
    return order[:, :kept].sort(dim=1).values
