"""Cached denoising features (DeepCache, Ma et al. 2024) over diffusers' UNet2DConditionModel.

A full step runs the whole UNet and keeps one deep feature: the hidden state that enters the up path at
the cache branch. A cached step runs only the shallow path: the time embedding, `conv_in`, the down
layers above the branch, then the up path from the branch on with the kept feature in place of
everything deeper (the rest of the down path, the mid block, the deeper up layers).

Branch ids and layer choice are DeepCacheSDHelper's (DeepCache 0.1.1, extension/deepcache.py):
branch B -> up block `B // 3` counted from the output (0 = the last up block) and layer `B % 3` in it,
counted from the block's last layer. With that (block b, layer l), a cached step
* computes the down blocks before b in full, and the first l layers (resnet + attention) of down block b;
* re-enters the up path at up block b's layer l (counted from its end), whose skip input is the last
  down output computed above (conv_in's output when b = l = 0), and its hidden input the kept feature;
* computes the rest of that up block (with its upsampler) and every later up block, then the output head.
This is exactly what the helper's module wrappers leave computing on a non-refresh step (everything else
returns its stored output and does not reach the result), so the result is the same, op for op.

Plain PyTorch over diffusers' own block modules: the full step here equals `unet(...)` bit for bit
(tests/runtime/test_deep_cache.py), the same modules in the same order.
"""
from __future__ import annotations

import torch

from editrt.errors import InputError

LAYERS_PER_BRANCH_BLOCK = 3  # DeepCacheSDHelper: cache_layer_id = branch % 3, cache_block_id = branch // 3


def branch_position(branch: int) -> tuple[int, int]:
    """(up block counted from the output, layer counted from that block's end) of a DeepCache branch id."""
    return branch // LAYERS_PER_BRANCH_BLOCK, branch % LAYERS_PER_BRANCH_BLOCK


def valid_branches(unet) -> list[int]:
    blocks = unet.up_blocks
    return [b * LAYERS_PER_BRANCH_BLOCK + layer for b in range(len(blocks))
            for layer in range(min(LAYERS_PER_BRANCH_BLOCK, len(blocks[len(blocks) - 1 - b].resnets)))]


def check_options(interval, branch) -> tuple[int, int] | None:
    """(interval, branch) from the user's cache_interval / cache_branch (branch default 0), or None when
    caching is off (no interval, or 1: every step full). InputError (field=) on a bad value."""
    if interval is None:
        if branch is not None:
            raise InputError(f"cache_branch {branch!r}: only with cache_interval (caching is off without it)",
                             field="cache_branch")
        return None
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise InputError(f"cache_interval: expected a whole number of steps >= 1, got {interval!r}", field="cache_interval")
    branch = 0 if branch is None else branch
    if isinstance(branch, bool) or not isinstance(branch, int) or branch < 0:
        raise InputError(f"cache_branch: expected a branch id >= 0 (block * 3 + layer), got {branch!r}", field="cache_branch")
    return None if interval == 1 else (interval, branch)


def check_branch(unet, branch) -> None:
    """InputError (field cache_branch) unless `branch` names a layer of this UNet's up path."""
    valid = valid_branches(unet)
    if isinstance(branch, bool) or not isinstance(branch, int) or branch not in valid:
        raise InputError(f"cache_branch: expected one of {', '.join(map(str, valid))} for this UNet "
                         f"(block * 3 + layer), got {branch!r}", field="cache_branch")


class DeepCacheUNet:
    """Full and cached steps of one UNet2DConditionModel at one cache branch (see the module docstring)."""

    def __init__(self, unet, branch: int):
        check_branch(unet, branch)
        c = unet.config
        if c.class_embed_type is not None or c.addition_embed_type is not None or c.center_input_sample:
            raise ValueError("DeepCacheUNet: class / added embeddings and centred inputs are not implemented")
        self.unet, self.branch = unet, branch
        block, self.layer = branch_position(branch)
        self.entry_block = len(unet.up_blocks) - 1 - block  # index into unet.up_blocks
        self.down_block = block  # the down block the cached step stops in (after `layer` layers)
        resnets = len(unet.up_blocks[self.entry_block].resnets)
        self.entry_layer = resnets - 1 - self.layer  # forward index of the first layer a cached step runs

    def _prologue(self, sample, timestep, encoder_hidden_states):
        u = self.unet
        for block in u.up_blocks:
            if all(getattr(block, name, None) for name in ("s1", "s2", "b1", "b2")):
                raise ValueError("DeepCacheUNet: FreeU is not implemented")
        resize = any(d % (2 ** u.num_upsamplers) for d in sample.shape[-2:])
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), None)
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        context = u.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=None)
        return u.conv_in(sample), emb, context, resize

    @staticmethod
    def _attend(block, j, h, context):
        if getattr(block, "attentions", None) is None:
            return h
        return block.attentions[j](h, encoder_hidden_states=context, cross_attention_kwargs=None, attention_mask=None,
                                   encoder_attention_mask=None, return_dict=False)[0]

    def _down(self, block, h, emb, context, layers: int | None = None):
        """The first `layers` layers of a down block (None: all, then its downsampler); (h, skip outputs)."""
        outputs = []
        for j, resnet in enumerate(block.resnets[:layers]):
            h = self._attend(block, j, resnet(h, emb), context)
            outputs.append(h)
        if layers is None and block.downsamplers is not None:
            for downsampler in block.downsamplers:
                h = downsampler(h)
            outputs.append(h)
        return h, outputs

    def _up(self, block, h, skips, emb, context, first: int, last: int):
        """Layers [first, last) of an up block, each on [h | the last skip]; (h, the unused skips)."""
        for j in range(first, last):
            h = torch.cat([h, skips[-1]], dim=1)
            skips = skips[:-1]
            h = self._attend(block, j, block.resnets[j](h, emb), context)
        return h, skips

    @staticmethod
    def _upsample(block, h, size):
        for upsampler in block.upsamplers or ():
            h = upsampler(h, size)
        return h

    def _head(self, h):
        u = self.unet
        if u.conv_norm_out is not None:
            h = u.conv_act(u.conv_norm_out(h))
        return u.conv_out(h)

    def full(self, sample, timestep, encoder_hidden_states) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise prediction, the deep feature a cached step reuses): UNet2DConditionModel.forward's ops."""
        u = self.unet
        h, emb, context, resize = self._prologue(sample, timestep, encoder_hidden_states)
        skips = [h]
        for block in u.down_blocks:
            h, outputs = self._down(block, h, emb, context)
            skips += outputs
        if getattr(u.mid_block, "has_cross_attention", False):
            h = u.mid_block(h, emb, encoder_hidden_states=context, attention_mask=None, cross_attention_kwargs=None,
                            encoder_attention_mask=None)
        elif u.mid_block is not None:
            h = u.mid_block(h, emb)
        size, feature = None, None
        for i, block in enumerate(u.up_blocks):
            n = len(block.resnets)
            mine, skips = skips[-n:], skips[:-n]
            if i < len(u.up_blocks) - 1 and resize:
                size = skips[-1].shape[2:]
            first = self.entry_layer if i == self.entry_block else n
            h, mine = self._up(block, h, mine, emb, context, 0, first)
            if i == self.entry_block:
                feature = h
                h, mine = self._up(block, h, mine, emb, context, first, n)
            h = self._upsample(block, h, size)
        return self._head(h), feature

    def cached(self, sample, timestep, encoder_hidden_states, feature) -> torch.Tensor:
        """The noise prediction of a cached step: the shallow path around `feature` (from the last full step)."""
        u = self.unet
        h, emb, context, resize = self._prologue(sample, timestep, encoder_hidden_states)
        skips = [h]
        for b in range(self.down_block + 1):
            h, outputs = self._down(u.down_blocks[b], h, emb, context, None if b < self.down_block else self.layer)
            skips += outputs
        h, size = feature, None
        for i in range(self.entry_block, len(u.up_blocks)):
            block = u.up_blocks[i]
            n = len(block.resnets)
            first = self.entry_layer if i == self.entry_block else 0
            mine, skips = skips[-(n - first):], skips[:-(n - first)]
            if i < len(u.up_blocks) - 1 and resize:
                size = skips[-1].shape[2:]
            h, _ = self._up(block, h, mine, emb, context, first, n)
            h = self._upsample(block, h, size)
        return self._head(h)


@torch.no_grad()
def step_flops(unet, branch: int, sample, timestep, encoder_hidden_states) -> dict[str, int]:
    """UNet work of one step, counted by torch.utils.flop_counter (matmuls, convolutions, attention):
    {"plain": unet(...), "full": a full step, "cached": a cached step}. Works on meta tensors, so the
    full-size UNet is counted without its weights or the time to run it."""
    from torch.utils.flop_counter import FlopCounterMode

    runner = DeepCacheUNet(unet, branch)
    counts = {}
    for name, step in (("plain", lambda: unet(sample, timestep, encoder_hidden_states=encoder_hidden_states)),
                       ("full", lambda: runner.full(sample, timestep, encoder_hidden_states))):
        with FlopCounterMode(display=False) as counter:
            result = step()
        counts[name] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        runner.cached(sample, timestep, encoder_hidden_states, result[1])
    counts["cached"] = counter.get_total_flops()
    return counts
