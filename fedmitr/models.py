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


# --- augmentation on batches -------------------------------------------------------------------------

def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None,
                 flip: bool = False) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` px (edge-replicated), optionally flip it.

    ``images`` [B, C, H, W]; returns the same shape. One gather, no Python loop over the batch.
    """
    if max_shift <= 0 and not flip:
        return images
    b, _, h, w = images.shape
    dev = images.device
    if max_shift > 0:
        padded = F.pad(images, (max_shift,) * 4, mode="replicate")
        dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator).to(dev)
        dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator).to(dev)
        rows = (torch.arange(h, device=dev).unsqueeze(0) + dy.unsqueeze(1))  # [B, H]
        cols = (torch.arange(w, device=dev).unsqueeze(0) + dx.unsqueeze(1))  # [B, W]
        batch = torch.arange(b, device=dev).view(b, 1, 1)
        images = padded.permute(0, 2, 3, 1)[batch, rows.unsqueeze(2), cols.unsqueeze(1)].permute(0, 3, 1, 2)
    if flip:
        do_flip = (torch.rand(b, generator=generator) < 0.5).to(dev).view(b, 1, 1, 1)
        images = torch.where(do_flip, images.flip(-1), images)
    return images.contiguous()
