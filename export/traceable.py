"""Export-only variants of the runtime's networks whose trace is generic in every dynamic input.

The TorchScript exporter records one run of the module: anything the forward turns into a Python
number (`int(tensor)`, a branch on a shape) becomes a constant of the graph, right only for the
example it was traced with. Each variant here computes exactly what its runtime network computes
(the parity checks in export/onnx.py compare the ONNX graph against the runtime network itself,
not against the variant), written with ops that trace to shape computations.

- `SamMaskDecoderForExport`: segment-anything's `SamOnnxModel` crops the up-sampled masks with
  `masks[..., :int(h'), :int(w')]`, where (h', w') is `orig_im_size` resized to the long side.
  `int()` froze the crop at the export example's (300, 451): every other image size got masks
  cropped wrongly (72-82 % relative L2 off) while low_res_masks and iou_predictions matched.
  `narrow` with a tensor length traces to a Slice whose end is computed from `orig_im_size`.
- UNets need no variant: diffusers forwards the skip connections' sizes to its up-samplers only
  when the latent is not a multiple of 2**num_upsamplers (a Python branch on the shape), so the
  exporter traces them at an odd latent size (export/onnx.py `trace_dims`), which records that
  path; with the sizes taken from the skips' shapes the graph serves every size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.utils.onnx import SamOnnxModel


class SamMaskDecoderForExport(SamOnnxModel):
    """`SamOnnxModel` with a mask post-processing that traces generically in `orig_im_size`."""

    @classmethod
    def of(cls, net: SamOnnxModel) -> SamMaskDecoderForExport:
        """The export variant of `net`, sharing its SAM weights and options."""
        return cls(net.model, return_single_mask=net.return_single_mask, use_stability_score=net.use_stability_score,
                   return_extra_metrics=net.return_extra_metrics)

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        # as SamOnnxModel: low-res masks -> SAM's padded square -> crop the image's part -> original size
        masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        prepadded = self.resize_longest_image_size(orig_im_size, self.img_size)  # int64 (2,): (h', w')
        masks = masks.narrow(2, 0, prepadded[0]).narrow(3, 0, prepadded[1])  # traced as Slice(end = h', w')
        size = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)


def export_module(name: str, network: nn.Module) -> nn.Module:
    """The module to trace for the runtime network `name` (itself where its trace is already generic)."""
    if name == "sam_mask_decoder" and isinstance(network, SamOnnxModel):
        return SamMaskDecoderForExport.of(network)
    return network
