"""The visibility rule of CogVideo's dual-channel attention, written once (DESIGN.md section 2).

Sequence layout: ``text_len`` text tokens, then ``frames`` frames of ``grid_h x grid_w`` tokens in (frame, row,
col) raster order. ``key_visible(query, key)`` below is the rule; csrc/dual_channel_visibility.h is the same
rule in C++/CUDA (the kernels compute it from token indices; no L x L mask exists there).

Pictures: 1 text token ``T``, 3 frames of 4x4, window 2. Rows = queries, ``#`` = visible key.

base channel (text + own frame), sequential: a frame query sees the text and its own frame up to itself::

    query frame 1, raster 5  (row 1, col 1):   text | frame 0 | frame 1 | frame 2
                                                 #  |  ....   |  ####   |  ....
                                                    |  ....   |  ##..   |  ....
                                                    |  ....   |  ....   |  ....
    interpolation: even frames 0, 2, 4, ... (given key frames) see their whole frame; odd frames causal as above.

plus channel, window 2, not shifted: the 4x4 grid splits into 4 windows of 2x2; a query sees the text and its
window in every frame, causal in (frame, raster) order (sequential)::

    query frame 1, row 1, col 1:   frame 0   frame 1   frame 2
                                   ##..      ##..      ....
                                   ##..      ##..      ....
                                   ....      ....      ....
                                   ....      ....      ....

plus channel, window 2, shifted (shift 1): CogVideo rolls the grid by (-1, -1), partitions windows and applies
the Swin region mask, so in original coordinates the groups per axis are {0} (the wrapped strip), {1, 2}, {3}::

    groups of the 4x4 grid:   A B B C        (row groups {0}, {1,2}, {3} x the same for columns)
                              D E E F
                              D E E F
                              G H H I

plus channel, interpolation stage (any frame count; the even frames 0, 2, 4, ... are given, CogVideo's released
model has 5): key-frame queries see every key frame (whole group), odd-frame queries see the key frames, their
own frame causally and earlier odd frames; never later odd frames.
plus channel text queries see nothing (output 0). Padded text keys (``text_pad_mask`` False) are invisible.
``attention="full"`` is the window rule with one window covering the whole grid (``window``/``shifted`` unused).
"""

from __future__ import annotations

import torch

CHANNELS = ("base", "plus")
ATTENTIONS = ("full", "window")
STAGES = ("sequential", "interpolation")


def _axis_group(coord: torch.Tensor, size: int, window: int, shift: int) -> torch.Tensor:
    """Spatial group along one axis: coord // window, or with a shift the rolled windows + wrapped strip."""
    if shift == 0:
        return coord // window
    return torch.where(coord < shift, torch.full_like(coord, size + 1), (coord - shift) // window)


def visibility(
    text_len: int,
    frames: int,
    grid_h: int,
    grid_w: int,
    channel: str,
    attention: str = "full",
    window: int = 10,
    shifted: bool = False,
    stage: str = "sequential",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dense (L, L) bool mask, ``mask[query, key]`` = key visible (text padding not applied)."""
    frame_size = grid_h * grid_w
    length = text_len + frames * frame_size
    idx = torch.arange(length, device=device)
    q, k = idx[:, None], idx[None, :]
    q_text, k_text = q < text_len, k < text_len
    pq, pk = (q - text_len).clamp(min=0), (k - text_len).clamp(min=0)
    fq, fk = pq // frame_size, pk // frame_size
    rq, rk = pq % frame_size, pk % frame_size
    interpolation = stage == "interpolation"
    if channel == "base":
        own = fq == fk
        causal = rk <= rq
        if interpolation:
            causal = causal | (fq % 2 == 0)
        frame_part = own & causal
        return torch.where(k_text, torch.ones_like(frame_part), frame_part & ~q_text)
    if attention == "window":
        shift = window // 2 if shifted else 0
        same_row = _axis_group(rq // grid_w, grid_h, window, shift) == _axis_group(rk // grid_w, grid_h, window, shift)
        same_col = _axis_group(rq % grid_w, grid_w, window, shift) == _axis_group(rk % grid_w, grid_w, window, shift)
        same = same_row & same_col
    else:
        same = torch.ones((length, length), dtype=torch.bool, device=device)
    if interpolation:
        time = (fk % 2 == 0) | ((fq % 2 == 1) & (((fk == fq) & (rk <= rq)) | (fk < fq)))
    else:
        time = pk <= pq
    frame_part = same & time & ~k_text
    return (frame_part | k_text) & ~q_text


def key_mask(
    text_pad_mask: torch.Tensor | None,
    batch: int,
    text_len: int,
    length: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B, L) bool: which keys exist (padded text keys False)."""
    keys = torch.ones((batch, length), dtype=torch.bool, device=device)
    if text_pad_mask is not None:
        keys[:, :text_len] = text_pad_mask.to(device=device, dtype=torch.bool)
    return keys
