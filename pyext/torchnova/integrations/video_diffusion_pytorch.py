"""torchnova for lucidrains' video-diffusion-pytorch (the reference code of Video Diffusion Models), pinned 0.7.0.

    import torchnova.integrations.video_diffusion_pytorch as tn_vdp
    model = Unet3D(dim=64, dim_mults=(1, 2, 4, 8))
    tn_vdp.patch(model)          # -> number of attention modules now running on torchnova
    tn_vdp.unpatch(model)        # -> number restored

What is replaced: every ``EinopsToAndFrom`` around a full ``Attention`` inside the model, i.e.
  * the temporal attentions ``EinopsToAndFrom('b c f h w', 'b (h w) f c', Attention(..., rotary_emb))`` (the
    init one, one per down/up level, the mid one) -> ``torchnova.temporal_attention_qkvpacked`` with
      - the model's ``RelativePositionBias`` output (the ``pos_bias`` the Unet3D passes) as ``bias``: its gradient
        reaches the embedding through autograd, as in the original;
      - the shared ``RotaryEmbedding`` applied to q and k inside the kernel (``rotary=(freqs.cos(), freqs.sin())``,
        interleaved pairs: rotary-embedding-torch's layout; it rotates the first min(32, dim_head) dims);
      - ``focus_present_mask`` (B,) as ``segment_ids``: a focusing sample gets one id per frame (each frame sees
        only itself), the others one id for all frames; all True keeps the original's shortcut
        (``to_out(v)``, no attention), all False means no mask;
      - the original's ``scale`` (dim_head ** -0.5; the original scales q before rotating it, the op scales the
        scores: the same up to rounding);
  * the full spatial attention ``EinopsToAndFrom('b c f h w', 'b f (h w) c', Attention(...))`` (the mid one)
    -> ``torchnova.spatial_attention_qkvpacked``.
``SpatialLinearAttention`` (linear attention, not softmax attention) is left alone.

How: the module's ``to_qkv`` projection runs on a channels-last view of the video (the original's rearrange is a
copy too), its (B, T, h, w, 3·H·D) output is viewed as the packed (B, T, S, 3, H, D) qkv of the ops (no
copy, no einops), the op's (B, T, S, H, D) output goes through ``to_out`` and comes back as a (B, C, T, h, w)
view. The patch sets an instance ``forward`` on each replaced ``EinopsToAndFrom`` (unpatch deletes it); no
parameter or buffer is added, so ``state_dict`` is unchanged and checkpoints load either way.

Falls back to the module's own forward, per call, where the op cannot express the input: a rotary embedding
with xpos scaling (``use_xpos``), keyword arguments a spatial attention never gets from ``Unet3D``, or a
layout other than the two above (then the module is not patched at all). Rotary tables that require grad
(``learned_freq=True``) run the temporal op on its reference backend, which differentiates them.
"""

from __future__ import annotations

import types

import torch

from ..spacetime.ops import spatial_attention_qkvpacked, temporal_attention_qkvpacked

__all__ = ["patch", "unpatch", "PIP_REQUIREMENT"]

PIP_REQUIREMENT = "video-diffusion-pytorch==0.7.0"
_TEMPORAL = ("b c f h w", "b (h w) f c")
_SPATIAL = ("b c f h w", "b f (h w) c")
_MARK = "_torchnova_patch"  # instance attribute of a patched module: (kind, backend, previous instance forward)


def _library():
    """The video_diffusion_pytorch module (imported here, never by ``import torchnova``)."""
    try:
        from video_diffusion_pytorch import video_diffusion_pytorch as vdp
    except ImportError as error:
        raise ImportError(
            "torchnova.integrations.video_diffusion_pytorch needs lucidrains' video-diffusion-pytorch: "
            f"pip install {PIP_REQUIREMENT}  (or pip install 'torchnova[integrations]')"
        ) from error
    return vdp


def _kind(module, vdp) -> str | None:
    if not isinstance(module, vdp.EinopsToAndFrom) or type(module.fn) is not vdp.Attention:
        return None
    layout = (module.from_einops, module.to_einops)
    return "temporal" if layout == _TEMPORAL else "spatial" if layout == _SPATIAL else None


def patch(model: torch.nn.Module, *, backend: str = "auto") -> int:
    """Route every full temporal and spatial ``Attention`` of a video-diffusion-pytorch model (a ``Unet3D``, a
    ``GaussianDiffusion`` holding one, or any module containing them) through torchnova's fused ops.

    Args:
        model: any ``nn.Module``; its submodules are searched.
        backend: passed to the ops ("auto", "cpp", "triton", "cuda", "reference").

    Returns:
        How many modules were replaced now (0 for an already patched model).
    """
    vdp = _library()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"patch: backend must be a str, got {type(backend).__name__}")
    replaced = 0
    for module in model.modules():
        kind = _kind(module, vdp)
        if kind is None or _MARK in module.__dict__:
            continue
        previous = module.__dict__.get("forward")
        forward = _temporal_forward if kind == "temporal" else _spatial_forward
        module.__dict__[_MARK] = (kind, backend, previous)
        module.forward = types.MethodType(forward, module)
        replaced += 1
    return replaced


def unpatch(model: torch.nn.Module) -> int:
    """Restore the original forward of every module ``patch`` replaced. Returns how many were restored."""
    restored = 0
    for module in model.modules():
        mark = module.__dict__.pop(_MARK, None)
        if mark is None:
            continue
        previous = mark[2]
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous
        restored += 1
    return restored


def _original_forward(module, x, **kwargs):
    return type(module).forward(module, x, **kwargs)


def _packed_qkv(attn, x):
    """x (B, C, T, h, w) -> (qkv (B, T, S, 3, H, D) view of one projection, the token grid (B, T, h, w))."""
    B, C, T, h, w = x.shape
    heads = attn.heads
    qkv = attn.to_qkv(x.permute(0, 2, 3, 4, 1))  # (B, T, h, w, 3·H·D), contiguous
    hidden = qkv.shape[-1] // 3
    return qkv.view(B, T, h * w, 3, heads, hidden // heads), (B, T, h, w)


def _project_out(attn, out, grid):
    """out (B, T, S, H, D) -> to_out -> (B, C, T, h, w) view."""
    B, T, h, w = grid
    y = attn.to_out(out.reshape(B, T, h, w, out.shape[-2] * out.shape[-1]))  # (B, T, h, w, C)
    return y.permute(0, 4, 1, 2, 3)


def _rotary_tables(rotary_emb, T: int, device, dtype):
    """cos, sin (T, rot_dim) exactly as rotary-embedding-torch's rotate_queries_or_keys builds them."""
    seq = rotary_emb.get_seq_pos(T, device=device, dtype=dtype)
    freqs = rotary_emb(seq, seq_len=T)[-T:]
    return freqs.cos(), freqs.sin()


def _temporal_forward(self, x, pos_bias=None, focus_present_mask=None, **kwargs):
    """Patched forward of EinopsToAndFrom('b c f h w', 'b (h w) f c', Attention): see the module docstring."""
    attn = self.fn
    rotary_emb = attn.rotary_emb
    if kwargs or x.dim() != 5 or (rotary_emb is not None and getattr(rotary_emb, "use_xpos", False)):
        return _original_forward(self, x, pos_bias=pos_bias, focus_present_mask=focus_present_mask, **kwargs)
    _, backend, _ = self.__dict__[_MARK]
    qkv, grid = _packed_qkv(attn, x)
    B, T = grid[0], grid[1]
    if focus_present_mask is not None and focus_present_mask.all():
        # the original's shortcut: every sample attends only to its own frame, i.e. out = v
        return _project_out(attn, qkv[:, :, :, 2], grid)
    segment_ids = None
    if focus_present_mask is not None and not (~focus_present_mask).all():
        frames = torch.arange(T, device=x.device)
        segment_ids = torch.where(focus_present_mask.reshape(B, 1), frames, -1)  # (B, T): own id per focusing frame
    rotary = None
    if rotary_emb is not None:
        rotary = _rotary_tables(rotary_emb, T, x.device, qkv.dtype)
    out = temporal_attention_qkvpacked(
        qkv, bias=pos_bias, segment_ids=segment_ids, scale=attn.scale, rotary=rotary, rotary_interleaved=True,
        backend=backend,
    )  # fmt: skip
    return _project_out(attn, out, grid)


def _spatial_forward(self, x, **kwargs):
    """Patched forward of EinopsToAndFrom('b c f h w', 'b f (h w) c', Attention) (no rotary, no bias, no mask)."""
    attn = self.fn
    if any(value is not None for value in kwargs.values()) or x.dim() != 5 or attn.rotary_emb is not None:
        return _original_forward(self, x, **kwargs)
    _, backend, _ = self.__dict__[_MARK]
    qkv, grid = _packed_qkv(attn, x)
    out = spatial_attention_qkvpacked(qkv, scale=attn.scale, backend=backend)
    return _project_out(attn, out, grid)
