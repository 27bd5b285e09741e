"""torchnova attention for diffusers' video UNets, one line: ``patch(unet)``; ``unpatch(unet)`` undoes it.

    import torchnova.integrations.diffusers as tn_diffusers
    n = tn_diffusers.patch(unet)          # UNet3DConditionModel, UNetMotionModel (AnimateDiff), or any block
    ...                                   # train / sample as before: same numbers, torchnova's kernels
    tn_diffusers.unpatch(unet)            # the previous processors again

``patch(module, *, backend="auto", temporal=True, spatial=True) -> int`` walks ``module`` and installs a torchnova
attention processor on

* (``temporal=True``) every self-attention inside a ``TransformerTemporalModel`` (``UNet3DConditionModel``'s
  ``transformer_in`` and ``temp_attentions``, I2VGen-XL) or an ``AnimateDiffTransformer3D`` (the motion modules
  of ``UNetMotionModel`` / ``MotionAdapter``; both attn1 and the second self-attention attn2 of their
  ``double_self_attention`` blocks). diffusers feeds them (batch·height·width, frames, C): they become
  ``torchnova.temporal_attention`` on the copy-free view (B=batch·h·w, T=frames, S=1, H, D).
* (``spatial=True``) ``attn1``, the self-attention, of every ``BasicTransformerBlock`` inside a
  ``Transformer2DModel`` (the spatial transformers of both UNets). diffusers feeds them (batch·frames, h·w, C):
  they become ``torchnova.spatial_attention`` on the view (B=batch·frames, T=1, S=h·w, H, D).

It returns how many attention modules it changed; a module that already has a torchnova processor is left alone
(a second ``patch`` returns 0). Cross-attention (``attn2`` with ``cross_attention_dim``) keeps its processor. Only
modules whose processor is diffusers' default ``AttnProcessor2_0`` are changed: another processor (xformers,
IP-Adapter, a user's) is kept, and ``patch`` says so in one warning. Neither call touches the state_dict (the
processors hold no weights); ``unpatch(module) -> int`` puts back the processor each module had before.

The processor is ``AttnProcessor2_0.__call__`` with the ``F.scaled_dot_product_attention`` call replaced: the
same ``spatial_norm``, 4-D (B, C, h, w) inputs, ``group_norm``, q/k norms (per-head LayerNorm, RMSNorm, L2 norm
over the head dim), ``to_out`` projection and dropout, ``residual_connection`` and ``rescale_output_factor``, the
same scale (head_dim ** -0.5). When ``to_q``, ``to_k`` and ``to_v`` are plain ``nn.Linear`` layers (no LoRA
wrapper, no hook) and there is no q/k norm, the three projections run as one matmul over their concatenated
weights and the attention reads q, k, v as strided slices of it (the ``*_qkvpacked`` ops: one gradient tensor);
otherwise it calls the layers themselves. AnimateDiff's sinusoidal position embedding is added by the
transformer block to its input before ``attn1`` / ``attn2`` are called, so it reaches the projections unchanged.

A call the torchnova ops cannot express runs diffusers' original processor instead, and the first such call of
each kind after a ``patch`` warns (the result is then exactly diffusers'): an ``attention_mask``,
``encoder_hidden_states`` given to a self-attention module (e.g. to ``attn2`` of a temporal block), extra
positional arguments or the deprecated ``scale`` keyword, an input that is neither 3-D nor 4-D, or a q/k norm of
a kind the processor does not know.

Speed rule (measured; docs/diffusers.md has the figures): on CPU tensors with backend "auto" (and
``TORCHNOVA_BACKEND`` unset or "auto"), a spatial self-attention over more than ``CPU_SPATIAL_MAX_TOKENS`` = 128
tokens per frame runs diffusers' own processor, without a warning (a speed choice, same math): there torch's
SDPA, itself a flash kernel on CPU, was as fast as or faster than the cpp spatial kernel (forward 15-20 % faster
at 256 and 1,024 tokens, 8 heads x 40, fwd+bwd within 1-12 %), while at 64 tokens (a small UNet's frames) the
kernel was faster. ``backend="cpp"`` always runs the kernel. Temporal attention always takes torchnova's kernel.

Pinned and tested with diffusers 0.42.1 (``pip install torchnova[integrations]``); diffusers is imported when
``patch`` / ``unpatch`` is first called, never by ``import torchnova``.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend
from ..spacetime.ops import (
    spatial_attention,
    spatial_attention_qkvpacked,
    temporal_attention,
    temporal_attention_qkvpacked,
)

__all__ = ["patch", "unpatch", "TorchnovaTemporalAttnProcessor", "TorchnovaSpatialAttnProcessor"]

PIP_PACKAGE = "diffusers==0.42.1"

# On CPU tensors with backend="auto", a spatial self-attention over more tokens than this keeps diffusers' SDPA:
# torch's CPU flash kernel measured as fast as or faster than the cpp spatial kernel there (module docstring).
CPU_SPATIAL_MAX_TOKENS = 128


def _diffusers():
    """diffusers' classes this module needs (imported on first use), or an ImportError naming the pip package."""
    try:
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0
        from diffusers.models.transformers.transformer_2d import Transformer2DModel
        from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
        from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
    except ImportError as error:
        raise ImportError(
            f"torchnova.integrations.diffusers needs the diffusers package: pip install {PIP_PACKAGE} "
            f"(or pip install 'torchnova[integrations]'); importing it failed with: {error}"
        ) from error
    return {
        "Attention": Attention,
        "AttnProcessor2_0": AttnProcessor2_0,
        "BasicTransformerBlock": BasicTransformerBlock,
        "Transformer2DModel": Transformer2DModel,
        "temporal_containers": (TransformerTemporalModel, AnimateDiffTransformer3D),
    }


class _WarnOnce:
    """One warning per distinct reason, shared by the processors that one ``patch`` call installed."""

    def __init__(self):
        self.seen: set[str] = set()

    def __call__(self, reason: str) -> None:
        if reason in self.seen or torch.compiler.is_compiling():
            return
        self.seen.add(reason)
        warnings.warn(
            f"torchnova.integrations.diffusers: {reason}; that call ran diffusers' own attention processor instead "
            "(same result, no torchnova kernel). Warned once per patch() call.",
            RuntimeWarning,
            stacklevel=4,
        )


def _is_plain_linear(layer) -> bool:
    """A bare nn.Linear whose forward nothing wraps (LoRA layers, forward hooks, diffusers' hook registry)."""
    return (
        type(layer) is nn.Linear
        and not layer._forward_hooks
        and not layer._forward_pre_hooks
        and "forward" not in layer.__dict__
    )


def _qk_norm_reason(norm, head_dim: int) -> str | None:
    """None if ``norm`` acts on each head's D-vector alone (so it may run on any view with D last), else why not."""
    if norm is None:
        return None
    shape = getattr(norm, "normalized_shape", None)  # nn.LayerNorm, diffusers' FP32LayerNorm
    if shape is None and type(norm).__name__ == "RMSNorm":  # diffusers' RMSNorm: mean of squares over dim -1
        shape = getattr(norm, "dim", None)
    if shape is not None:  # normalizes over the trailing `shape` dims
        if tuple(shape) == (head_dim,):
            return None
        return f"a q/k norm over {tuple(shape)} (not the head dim {head_dim})"
    if type(norm).__name__ == "LpNorm" and getattr(norm, "dim", None) in (-1,):
        return None
    return f"a q/k norm of type {type(norm).__name__}"


class _TorchnovaAttnProcessor:
    """``AttnProcessor2_0`` with torchnova's attention. Subclasses set the layout (``_attend``)."""

    kind = ""

    def __init__(self, original, backend: str = "auto", warn_once: _WarnOnce | None = None):
        self.original = original  # the processor the module had; unpatch() restores it, fallbacks call it
        self.backend = backend
        self._warn = warn_once if warn_once is not None else _WarnOnce()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}, original={type(self.original).__name__})"

    # The signature is AttnProcessor2_0's: Attention.forward keeps only the keyword arguments it names.
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        reason = self._unsupported(attn, hidden_states, encoder_hidden_states, attention_mask, args, kwargs)
        if reason is not None:
            self._warn(reason)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if self._library_is_faster(hidden_states):  # a speed choice, same math: no warning
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        N, L, _ = hidden_states.shape  # N sequences of L tokens
        heads = attn.heads
        head_dim = attn.to_q.out_features // heads
        scale = head_dim**-0.5  # F.scaled_dot_product_attention's default, as AttnProcessor2_0 uses it
        if attn.norm_q is None and attn.norm_k is None and _fusable(attn):
            weight = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
            bias = None if attn.to_q.bias is None else torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias])
            qkv = F.linear(hidden_states, weight, bias).view(N, L, 3, heads, head_dim)
            out = self._attend_packed(qkv, scale)
        else:
            query = attn.to_q(hidden_states).view(N, L, heads, head_dim)
            key = attn.to_k(hidden_states).view(N, L, heads, head_dim)
            value = attn.to_v(hidden_states).view(N, L, heads, head_dim)
            if attn.norm_q is not None:  # per (token, head) over D: the same on this view as on (N, H, L, D)
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            out = self._attend(query, key, value, scale)
        hidden_states = out.reshape(N, L, heads * head_dim)

        hidden_states = attn.to_out[0](hidden_states)  # linear proj
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        if attn.rescale_output_factor == 1.0:  # x / 1.0 is x: skip the pass over the output (and its backward)
            return hidden_states
        return hidden_states / attn.rescale_output_factor

    def _unsupported(self, attn, hidden_states, encoder_hidden_states, attention_mask, args, kwargs) -> str | None:
        if attention_mask is not None:
            return "an attention_mask was given (the torchnova ops take no arbitrary mask)"
        if encoder_hidden_states is not None:
            return "encoder_hidden_states were given to a patched self-attention (cross-attention)"
        if args or kwargs.get("scale") is not None:
            return "extra positional arguments or the deprecated `scale` keyword were given"
        if hidden_states.ndim not in (3, 4):
            return f"a {hidden_states.ndim}-D input (expected (N, L, C) or (B, C, h, w))"
        head_dim = attn.to_q.out_features // attn.heads
        for norm in (attn.norm_q, attn.norm_k):
            why = _qk_norm_reason(norm, head_dim)
            if why is not None:
                return why
        return None

    def _library_is_faster(self, hidden_states) -> bool:
        """True where diffusers' own attention measured faster than torchnova's, under backend "auto" only."""
        return False

    def _attend(self, query, key, value, scale):  # (N, L, H, D) each -> (N, L, H, D)-shaped output
        raise NotImplementedError

    def _attend_packed(self, qkv, scale):  # (N, L, 3, H, D) -> (N, L, H, D)-shaped output
        raise NotImplementedError


class TorchnovaTemporalAttnProcessor(_TorchnovaAttnProcessor):
    """Self-attention over frames: diffusers' (batch·h·w, frames, C) rows as torchnova's (B·h·w, T, 1, H, D).

    S = 1 keeps every view copy-free (diffusers' (N, L, H·D) projection is already (N, T, 1, H, D) in memory) and
    the output, contiguous (B, T, 1, H, D), is the (N, L, H·D) input of ``to_out`` with no transpose."""

    kind = "temporal"

    def _attend(self, query, key, value, scale):
        q, k, v = (x.unsqueeze(2) for x in (query, key, value))
        return temporal_attention(q, k, v, scale=scale, backend=self.backend)

    def _attend_packed(self, qkv, scale):
        return temporal_attention_qkvpacked(qkv.unsqueeze(2), scale=scale, backend=self.backend)


class TorchnovaSpatialAttnProcessor(_TorchnovaAttnProcessor):
    """Self-attention within a frame: diffusers' (batch·frames, h·w, C) rows as torchnova's (B·F, 1, h·w, H, D)."""

    kind = "spatial"

    def _library_is_faster(self, hidden_states) -> bool:
        """On CPU under backend "auto", frames of more than CPU_SPATIAL_MAX_TOKENS tokens keep diffusers' SDPA."""
        if hidden_states.device.type != "cpu":
            return False
        requested = self.backend if self.backend != "auto" else os.environ.get(_backend.ENV_VAR, "auto") or "auto"
        if requested != "auto":
            return False
        shape = hidden_states.shape  # (N, L, C) or (B, C, h, w)
        tokens = shape[1] if hidden_states.ndim == 3 else shape[-2] * shape[-1]
        return tokens > CPU_SPATIAL_MAX_TOKENS

    def _attend(self, query, key, value, scale):
        q, k, v = (x.unsqueeze(1) for x in (query, key, value))
        return spatial_attention(q, k, v, scale=scale, backend=self.backend)

    def _attend_packed(self, qkv, scale):
        return spatial_attention_qkvpacked(qkv.unsqueeze(1), scale=scale, backend=self.backend)


def _fusable(attn) -> bool:
    layers = (attn.to_q, attn.to_k, attn.to_v)
    if not all(_is_plain_linear(layer) for layer in layers):
        return False
    with_bias = [layer.bias is not None for layer in layers]
    return all(with_bias) or not any(with_bias)


def _skip_reason(attn, classes) -> str | None:
    """Why ``attn`` keeps its processor (None: it can take a torchnova one)."""
    if type(attn.processor) is not classes["AttnProcessor2_0"]:
        return f"processor {type(attn.processor).__name__} (only AttnProcessor2_0 is replaced)"
    if attn.is_cross_attention or attn.added_kv_proj_dim is not None or attn.only_cross_attention:
        return "cross-attention"
    if attn.to_k is None or attn.to_v is None or attn.to_out is None:
        return "no to_k / to_v / to_out"
    q_features, k_features, v_features = attn.to_q.out_features, attn.to_k.out_features, attn.to_v.out_features
    if not (q_features == k_features == v_features) or q_features % attn.heads:
        return f"q/k/v widths {q_features}/{k_features}/{v_features} for {attn.heads} heads (grouped-query attention)"
    return None


def _targets(module: nn.Module, classes, temporal: bool, spatial: bool) -> dict[int, tuple[nn.Module, type]]:
    """id -> (Attention module, processor class) for the attention modules ``patch`` is about."""
    Attention = classes["Attention"]
    found: dict[int, tuple[nn.Module, type]] = {}
    if temporal:
        for container in module.modules():
            if isinstance(container, classes["temporal_containers"]):
                for attn in container.modules():
                    if isinstance(attn, Attention):
                        found[id(attn)] = (attn, TorchnovaTemporalAttnProcessor)
    if spatial:
        for container in module.modules():
            if isinstance(container, classes["Transformer2DModel"]):
                for block in container.modules():
                    if isinstance(block, classes["BasicTransformerBlock"]) and isinstance(block.attn1, Attention):
                        found.setdefault(id(block.attn1), (block.attn1, TorchnovaSpatialAttnProcessor))
    return found


def patch(module: nn.Module, *, backend: str = "auto", temporal: bool = True, spatial: bool = True) -> int:
    """Install torchnova attention processors in ``module`` (see the module docstring); returns how many.

    Args:
        module: any nn.Module holding diffusers video blocks: a ``UNet3DConditionModel``, a ``UNetMotionModel``,
            a ``MotionAdapter``, one ``AnimateDiffTransformer3D`` / ``TransformerTemporalModel`` /
            ``Transformer2DModel``, or a down/up block.
        backend: passed to the torchnova ops ("auto", "cuda", "triton", "cpp" or "reference").
        temporal: patch the self-attentions of the temporal transformers.
        spatial: patch ``attn1`` of the 2-D transformers' blocks.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"patch: module must be a torch.nn.Module, got {type(module).__name__}")
    if backend != "auto" and backend not in _backend.BACKEND_NAMES:
        raise ValueError(f"patch: backend must be 'auto' or one of {_backend.BACKEND_NAMES}, got {backend!r}")
    for name, flag in (("temporal", temporal), ("spatial", spatial)):
        if not isinstance(flag, bool):
            raise TypeError(f"patch: {name} must be a bool, got {type(flag).__name__}")
    classes = _diffusers()
    warn_once = _WarnOnce()
    patched, kept = 0, {}
    for attn, processor_class in _targets(module, classes, temporal, spatial).values():
        if isinstance(attn.processor, _TorchnovaAttnProcessor):
            continue  # already patched
        reason = _skip_reason(attn, classes)
        if reason is not None:
            if reason != "cross-attention":
                kept[reason] = kept.get(reason, 0) + 1
            continue
        attn.set_processor(processor_class(attn.processor, backend, warn_once))
        patched += 1
    if kept:
        listed = "; ".join(f"{count} with {reason}" for reason, count in kept.items())
        warnings.warn(f"torchnova.integrations.diffusers.patch kept these attention modules as they were: {listed}",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
    return patched


def unpatch(module: nn.Module) -> int:
    """Give every attention module in ``module`` that ``patch`` changed its previous processor; returns how many."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"unpatch: module must be a torch.nn.Module, got {type(module).__name__}")
    classes = _diffusers()
    restored = 0
    for attn in module.modules():
        if isinstance(attn, classes["Attention"]) and isinstance(attn.processor, _TorchnovaAttnProcessor):
            attn.set_processor(attn.processor.original)
            restored += 1
    return restored
