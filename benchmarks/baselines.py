"""The stock models MM-GEM is compared with, built on MM-GEM's own weights (shared modules, no copies).

Sharing the very modules makes each A/B pair differ only in what MM-GEM adds or removes: any gap is overhead (or
saving) of MM-GEM's code path, not of different weights, dtypes or memory layouts.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from .sizes import BenchModel


def clip_style_image_head(bm: BenchModel) -> nn.Linear:
    """CLIP's `visual_projection`: one linear layer from the tower's pooled output to the embedding space.

    Its weights are the first layer of MM-GEM's h1, so the matrix shapes (and FLOPs) are those of a CLIP image
    embedding of the same tower.
    """
    first = bm.model.image_projection.layers[0]
    head = nn.Linear(first.in_features, first.out_features, bias=False, device=bm.device, dtype=bm.dtype)
    with torch.no_grad():
        head.weight.copy_(first.weight)
    return head


def llava_on_shared_weights(bm: BenchModel) -> LlavaForConditionalGeneration:
    """A `LlavaForConditionalGeneration` with the identical vision and LM configs, reusing MM-GEM's tower, LM and
    `lm_head`; only LLaVA's 2-layer projector is new. It feeds all `g*g` patch tokens of the last layer (CLS dropped,
    `vision_feature_select_strategy="default"`), where MM-GEM feeds its `k*k` pooled tokens.

    Built on the meta device first, so the throw-away random tower and LM are never allocated.
    """
    cfg = bm.config
    num_patches = cfg.patch_grid_size**2
    llava_config = LlavaConfig(
        vision_config=cfg.vision_config.to_dict(),
        text_config=cfg.text_config.to_dict(),
        image_token_index=cfg.image_token_id,
        image_seq_length=num_patches,
        vision_feature_layer=-1,  # MM-GEM reads the last layer too (LLaVA-1.5 uses -2; the cost is the same)
        vision_feature_select_strategy="default",
    )
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(llava_config)
    llava.model.vision_tower = bm.model.vision_model
    llava.model.language_model = bm.model.language_model.model
    llava.lm_head = bm.model.language_model.lm_head
    with torch.device(bm.device):
        llava.model.multi_modal_projector = LlavaMultiModalProjector(llava_config).to(bm.dtype)
    left_on_meta = [name for name, p in llava.named_parameters() if p.is_meta]
    if left_on_meta:
        raise RuntimeError(f"LLaVA baseline has parameters left on the meta device: {left_on_meta[:5]}")
    generation = llava.generation_config
    generation.pad_token_id = cfg.text_config.pad_token_id
    generation.bos_token_id = cfg.text_config.bos_token_id
    generation.eos_token_id = cfg.text_config.eos_token_id
    return llava.eval()


def llava_prompt(bm: BenchModel, batch: int) -> torch.Tensor:
    """`<bos> <image>*(g*g) [CAP]`: the LLaVA prompt with one placeholder per patch token."""
    cfg = bm.config
    row = [cfg.text_config.bos_token_id] + [cfg.image_token_id] * cfg.patch_grid_size**2 + [cfg.cap_token_id]
    return torch.tensor([row] * batch, device=bm.device)
