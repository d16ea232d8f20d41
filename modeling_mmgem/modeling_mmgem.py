"""MM-GEM, the Multi-Modal Generative Embedding Model (arXiv 2405.19333), as a transformers model.

One vision tower and ONE causal language model. The language model embeds texts (its last hidden state at an
appended `[EMB]` token) and writes captions from pooled visual tokens; three light projections link the spaces:

    h1: visual features      -> shared embedding space   (image / region embedding)
    h2: visual features      -> LM input-embedding space (visual tokens for captioning)
    h3: LM hidden at `[EMB]` -> shared embedding space   (text embedding)

Token layouts. Embedding: `<bos> text [EMB]`. Captioning: `<bos> <image>*K [CAP] caption <eos>`, where the K
`<image>` placeholders are replaced inside the model by the h2 outputs (LLaVA-style, so `generate` and its KV cache
work unchanged).

This file is remote code: it travels to the Hub next to the weights, imports only torch and transformers, and reaches
its siblings through single-dot relative imports.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_mmgem import MMGEMConfig
from .image_loading_mmgem import box_problem, too_many_boxes
from .loss_mmgem import NO_KEY, caption_loss, contrastive_loss, pixel_row_keys, token_row_keys
from .utils_mmgem import CACHE_NAME, DEFAULT_MAX_CAPTION_TOKENS, cache_argument, register_checkpoint_upgrades

BoxesInput = list[torch.Tensor] | torch.Tensor | None


class FlatBoxes(NamedTuple):
    """The region boxes of a batch, flattened: `boxes` [R, 4] (normalised xyxy) and `image_index` [R]."""

    boxes: torch.Tensor
    image_index: torch.Tensor


# What the caption rows of `forward` (`input_ids`) are: one per image, one per region, or one per image then one
# per region (the layout MMGEMProcessor gives for a training batch with regions).
CaptionRows = Literal["images", "regions", "images_and_regions"]
CAPTION_ROWS = ("images", "regions", "images_and_regions")


# ---------------------------------------------------------------------------------------------------------- outputs
@dataclass
class MMGEMFeaturesOutput(BaseModelOutputWithPooling):
    r"""
    Output of [`MMGEMModel.get_image_features`] and [`MMGEMModel.get_text_features`]. As transformers'
    `CLIPModel.get_image_features`, the embedding is in `pooler_output`, so code written for CLIP works unchanged.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Images: the patch features `(B, g*g, vision_hidden)` the PoolAggregator pools (CLS dropped).
            Texts: the language model's last hidden states `(B, L, text_hidden)`, right padded, `[EMB]` appended.
        pooler_output (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            The embeddings, NOT L2-normalised (normalise before taking cosine similarities). With `boxes`, one row
            per region, regions of image 0 first: shape `(total_regions, projection_dim)`.
        region_image_index (`torch.LongTensor` of shape `(total_regions,)`, *optional*):
            For region embeddings, the index of the image each row belongs to.
    """

    region_image_index: torch.LongTensor | None = None


@dataclass
class MMGEMOutput(ModelOutput):
    r"""
    Output of [`MMGEMModel.forward`]: the joint training step and the captioning forward used by `generate`.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            `contrastive_loss_weight * loss_contrastive + caption_loss_weight * loss_caption` (the terms present).
        loss_contrastive (`torch.FloatTensor` of shape `()`, *optional*):
            Symmetric InfoNCE, image->text plus text->image, when `pixel_values` and `text_input_ids` are given.
        loss_caption (`torch.FloatTensor` of shape `()`, *optional*):
            Next-token cross-entropy on the caption tokens, when `labels` are given.
        logits_per_image (`torch.FloatTensor` of shape `(num_visual, num_texts)`):
            Scaled cosine similarities image/region x text. In distributed training the columns span all ranks.
        logits_per_text (`torch.FloatTensor` of shape `(num_texts, num_visual)`):
            Scaled cosine similarities text x image/region.
        image_embeds (`torch.FloatTensor` of shape `(num_visual, projection_dim)`):
            L2-normalised image embeddings, followed by the region embeddings when `boxes` are given.
        text_embeds (`torch.FloatTensor` of shape `(num_texts, projection_dim)`):
            L2-normalised text embeddings.
        logits (`torch.FloatTensor` of shape `(num_sequences, sequence_length, vocab_size)`):
            Language-model logits over the caption sequence (`input_ids`).
        cache (`transformers.Cache`, *optional*):
            The language model's KV cache, for `generate`. The field is named after the installed transformers
            (`cache` from 5.24, `past_key_values` before); both attribute names work on every release.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Language-model hidden states of the caption sequence, when `output_hidden_states=True`.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            Language-model attention weights, when `output_attentions=True` (eager attention).
        image_outputs (`BaseModelOutputWithPooling`, *optional*):
            The vision tower's own output when it ran (its `hidden_states` / `attentions` with
            `output_hidden_states` / `output_attentions`), as transformers' vision-language models return it.
    """

    loss: torch.FloatTensor | None = None
    loss_contrastive: torch.FloatTensor | None = None
    loss_caption: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    if CACHE_NAME == "cache":
        cache: Any | None = None  # transformers >= 5.24 maps reads of `past_key_values` onto it
    else:
        # transformers < 5.24 looks the cache up in model outputs as `past_key_values` (`key in outputs`).
        past_key_values: Any | None = None

        @property
        def cache(self) -> Any | None:
            """The KV cache under its transformers >= 5.24 name."""
            return self.past_key_values

    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_outputs: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple:
        """The fields present, in order; the vision tower's output as a tuple too (as transformers' multimodal
        outputs do), so that a tuple output holds only tensors and tuples."""
        return tuple(self[k].to_tuple() if k == "image_outputs" else self[k] for k in self.keys())


# ---------------------------------------------------------------------------------------------------------- modules
class MMGEMProjection(nn.Module):
    """One of h1/h2/h3: a linear layer or a Linear-GELU-Linear MLP."""

    def __init__(self, in_features: int, out_features: int, projection_type: str) -> None:
        super().__init__()
        if projection_type == "linear":
            self.layers = nn.Sequential(nn.Linear(in_features, out_features))
        else:
            self.layers = nn.Sequential(
                nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features)
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class MMGEMLogitScale(nn.Module):
    """The learnable log temperature of the contrastive loss, clamped as CLIP does.

    A module rather than a bare `nn.Parameter` so that PEFT's `modules_to_save` can train and save it. The value
    has shape (1,), not (), because FSDP shards parameters along their first dimension; `forward` returns a 0-d
    tensor all the same. State dicts with the older 0-d value load too (`load_state_dict`, PEFT, accelerate).
    """

    def __init__(self, init_value: float, max_value: float) -> None:
        super().__init__()
        self.log_value = nn.Parameter(torch.tensor([float(init_value)]))  # [1]
        self.max_value = max_value
        self._register_load_state_dict_pre_hook(self._upgrade_scalar)

    @staticmethod
    def _upgrade_scalar(state_dict: dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
        value = state_dict.get(prefix + "log_value")
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            state_dict[prefix + "log_value"] = value.reshape(1)

    def forward(self) -> torch.Tensor:
        return self.log_value.clamp(max=self.max_value).exp().squeeze(0)  # []


class MMGEMPoolAggregator(nn.Module):
    """Pools a ViT patch grid into few visual tokens, for whole images and (RoIAlign) for boxes.

    Whole image: adaptive average pooling to `k x k` (caption tokens) and to `1 x 1` (embedding). Box: RoIAlign,
    bilinear samples on a regular grid inside the box, averaged per cell to `k x k` and overall to `1 x 1`. With
    `ceil(g / k)` samples per cell and `g % k == 0`, the samples of the whole-image box fall on the patch centres, so
    the whole-image box gives exactly the whole-image features.
    """

    def __init__(self, grid_size: int, patch_grid_size: int, sampling_ratio: int | None = None) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.patch_grid_size = patch_grid_size
        self.sampling_ratio = sampling_ratio or -(-patch_grid_size // grid_size)

    def to_feature_map(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """[B, g*g, C] patch tokens (row-major) -> [B, C, g, g] feature map."""
        batch, num_patches, channels = patch_tokens.shape
        g = self.patch_grid_size
        return patch_tokens.transpose(1, 2).reshape(batch, channels, g, g)

    def pool_grid(self, feature_map: torch.Tensor) -> torch.Tensor:
        """[B, C, g, g] -> [B, k*k, C] visual tokens."""
        pooled = F.adaptive_avg_pool2d(feature_map, self.grid_size)  # [B, C, k, k]
        return pooled.flatten(2).transpose(1, 2)

    def pool_global(self, feature_map: torch.Tensor) -> torch.Tensor:
        """[B, C, g, g] -> [B, C] whole-image vector."""
        return feature_map.mean(dim=(2, 3))

    def roi_align(self, feature_map: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """RoIAlign of normalised xyxy `boxes` [R, 4] on the maps of `image_index` [R] -> [R, C, k, k]."""
        k, s = self.grid_size, self.sampling_ratio
        n = k * s  # sample points per axis
        steps = (torch.arange(n, device=boxes.device, dtype=boxes.dtype) + 0.5) / n  # [n] in (0, 1)
        x0, y0, x1, y1 = boxes.unbind(-1)  # each [R]
        xs = x0[:, None] + (x1 - x0)[:, None] * steps  # [R, n]
        ys = y0[:, None] + (y1 - y0)[:, None] * steps  # [R, n]
        # grid_sample takes (x, y) in [-1, 1] where -1/+1 are the outer edges of the map (align_corners=False).
        grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1) * 2 - 1  # [R, n, n, 2]
        maps = feature_map[image_index]  # [R, C, g, g]
        samples = F.grid_sample(maps, grid.to(maps.dtype), mode="bilinear", align_corners=False)  # [R, C, n, n]
        return F.avg_pool2d(samples, kernel_size=s)  # [R, C, k, k]

    def pool_regions(
        self, feature_map: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Region tokens [R, k*k, C] and region vectors [R, C] for normalised xyxy `boxes` [R, 4]."""
        cells = self.roi_align(feature_map, boxes, image_index)  # [R, C, k, k]
        return cells.flatten(2).transpose(1, 2), cells.mean(dim=(2, 3))


# ---------------------------------------------------------------------------------------------------------- checks
def _flatten_boxes(
    boxes: BoxesInput, batch_size: int, device: torch.device | str, check_values: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate `boxes` (one [R_i, 4] tensor per image, or a [B, R, 4] tensor) and flatten them on `device`.

    Structure (types, shapes, counts) is always checked; the coordinates only with `check_values` (it reads them on
    the host: the training step, whose boxes the processor already checked, skips it).

    Returns:
        boxes [R_total, 4] (float32, normalised xyxy) and image_index [R_total].
    """
    expected = (
        "`boxes` must be a list with one float tensor of shape [R_i, 4] per image (normalised x0, y0, x1, y1 in "
        "the frame of `pixel_values`, 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1) or a tensor of shape [B, R, 4]"
    )
    if isinstance(boxes, torch.Tensor):
        if boxes.ndim != 3:
            raise ValueError(f"{expected}; got a tensor of shape {tuple(boxes.shape)}.")
        boxes = list(boxes.unbind(0))
    if not isinstance(boxes, (list, tuple)):
        raise ValueError(f"{expected}; got {type(boxes).__name__}.")
    if len(boxes) != batch_size:
        raise ValueError(f"{expected}; got {len(boxes)} box sets for {batch_size} images.")
    flat, index = [], []
    for i, image_boxes in enumerate(boxes):
        image_boxes = torch.as_tensor(image_boxes, dtype=torch.float32, device=device)
        if image_boxes.ndim != 2 or image_boxes.shape[-1] != 4:
            raise ValueError(f"{expected}; boxes[{i}] has shape {tuple(image_boxes.shape)}.")
        problem = too_many_boxes(image_boxes.shape[0])
        if check_values and not problem:  # tolerate rounding of boxes that touch the border
            problem = box_problem(image_boxes, 1.0, 1.0, "image (normalised frame)", tolerance=1e-4)
        if problem:
            raise ValueError(f"{expected}; boxes[{i}] {problem}: {image_boxes.tolist()}.")
        flat.append(image_boxes.clamp(0, 1))
        index.append(torch.full((image_boxes.shape[0],), i, dtype=torch.long, device=device))
    if not flat or sum(b.shape[0] for b in flat) == 0:
        raise ValueError(f"{expected}; got no box at all.")
    return torch.cat(flat), torch.cat(index)


def _skip_value_checks() -> bool:
    """Whether value checks (which read tensor values on the host) must be skipped: under torch.compile or
    tracing, where the traced graph must not branch on values; the eager public entry points check them."""
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)()
    return compiling or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def check_token_ids(ids: torch.Tensor, vocab_size: int, argument: str) -> None:
    """A ValueError naming `argument` for an empty batch or token ids outside `[0, vocab_size)`.

    Without it a bad id is an IndexError (CPU) or a device-side assert (CUDA) deep inside the embedding lookup.
    """
    if ids.shape[0] == 0:
        raise ValueError(f"`{argument}` has no rows (batch size 0); give at least one sequence.")
    if _skip_value_checks() or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"`{argument}` holds token ids in [{low}, {high}], outside the vocabulary [0, {vocab_size}) "
            "(tokenize with this model's processor)."
        )


# ---------------------------------------------------------------------------------------------------------- models
class MMGEMPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the attributes transformers reads on MM-GEM models."""

    config_class = MMGEMConfig
    config: MMGEMConfig
    base_model_prefix = "mmgem"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["cache", "past_key_values"]
    # The Trainer must not pass `num_items_in_batch`: the joint loss normalises itself.
    accepts_loss_kwargs = False
    # A dict (empty: tying lives in the language model, collected by `post_init`) so that PEFT also finds the
    # language model's tied embeddings, e.g. to keep the `[EMB]`/`[CAP]` rows of a tied `lm_head` trainable.
    _tied_weights_keys: dict[str, str] = {}
    # Static-cache generation compiles the forward with fullgraph=True: the value checks are skipped while compiling.
    _can_compile_fullgraph = True

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Initialise the weights that were not loaded: each sub-model (vision tower, language model) with its own
        scheme, then MM-GEM's own modules.

        transformers' composite dispatch hands a sub-model the outer model's "custom code" flag, under which a module
        without parameters of its own (e.g. CLIP's attention block, which initialises its q/k/v projections) counts
        as done and is skipped: a tower missing from a folder would start at N(0, 0.02) instead of its own scheme.
        Each sub-model is therefore initialised through its own `initialize_weights` first. Loaded weights are never
        touched (transformers' init functions skip them).
        """
        for child in self.children():
            if isinstance(child, PreTrainedModel):
                child.initialize_weights()
        super().initialize_weights()

    def _init_weights(self, module: nn.Module) -> None:
        # Only MM-GEM's own modules: the vision tower and the LM are initialised by their own classes.
        std = self.config.initializer_range
        if isinstance(module, MMGEMLogitScale):
            init.constant_(module.log_value, self.config.logit_scale_init_value)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)


class MMGEMModel(MMGEMPreTrainedModel, GenerationMixin):
    """MM-GEM: image/region/text embeddings in one space and captioning of images and regions, with one LLM.

    - [`get_image_features`]: image (or, with `boxes`, region) embeddings.
    - [`get_text_features`]: text embeddings from the hidden state at `[EMB]`.
    - [`forward`]: the joint training step (contrastive + caption loss), also the captioning forward of `generate`.
    - [`generate`]: captions of images or regions through transformers' `GenerationMixin` (KV cache, greedy, beam
      search, sampling).
    """

    def __init__(self, config: MMGEMConfig) -> None:
        super().__init__(config)
        vision_model = AutoModel.from_config(config.vision_config)
        # The language model is the first child: PEFT's prompt learning (prompt tuning, P-tuning) takes the first
        # pretrained child as the backbone and looks there for the vocabulary-sized word embedding table.
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.vision_model = vision_model
        vision_hidden = config.vision_config.hidden_size
        text_hidden = config.text_config.hidden_size
        self.pool_aggregator = MMGEMPoolAggregator(
            config.pool_grid_size, config.patch_grid_size, config.region_sampling_ratio
        )
        self.image_projection = MMGEMProjection(vision_hidden, config.projection_dim, config.projection_type)  # h1
        self.visual_token_projection = MMGEMProjection(vision_hidden, text_hidden, config.projection_type)  # h2
        self.text_projection = MMGEMProjection(text_hidden, config.projection_dim, config.projection_type)  # h3
        self.logit_scale = MMGEMLogitScale(config.logit_scale_init_value, config.logit_scale_max)
        # device_map must keep each transformer block of either tower on one device.
        self._no_split_modules = sorted(
            set(getattr(self.vision_model, "_no_split_modules", None) or [])
            | set(getattr(self.language_model, "_no_split_modules", None) or [])
        )
        self._lm_cache_argument = cache_argument(self.language_model.forward)
        self.post_init()

    @staticmethod
    def pipeline_classes() -> dict[str, type]:
        """transformers' pipeline class of each task the model serves (`config.custom_pipelines`).

        Imported here, not with the model: transformers' pipeline machinery is a tenth of a second that loading a
        model never needs. (`save_pretrained` copies pipeline_mmgem.py next to this file through this import.)
        """
        from .pipeline_mmgem import pipeline_classes

        return pipeline_classes()

    # ------------------------------------------------------------------ embeddings plumbing (resize, tying, PEFT)
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.language_model.set_output_embeddings(new_embeddings)

    def get_decoder(self) -> nn.Module:
        return self.language_model.base_model

    # ------------------------------------------------------------------ vision
    def _checks_values(self) -> bool:
        """Whether `forward` checks the values of its inputs (token ids in the vocabulary, finite pixels, boxes in
        the image, placeholders matching the visual tokens), which reads them on the host.

        Not in training mode: the training step takes what MMGEMProcessor / MMGEMCollator made and checked, and a
        step that waits for the device is a slow step. Nor under torch.compile or tracing. The eager entry points
        (`get_image_features`, `get_text_features`, `get_visual_tokens`, `generate`) always check.
        """
        return not self.training and not _skip_value_checks()

    def _check_pixel_values(self, pixel_values: torch.Tensor, check_values: bool = True) -> None:
        vision = self.config.vision_config
        channels = getattr(vision, "num_channels", 3)
        size = vision.image_size
        if (
            not isinstance(pixel_values, torch.Tensor)
            or pixel_values.ndim != 4
            or pixel_values.shape[1] != channels
            or tuple(pixel_values.shape[2:]) != (size, size)
        ):
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(
                f"`pixel_values` must be a float tensor of shape [batch, {channels}, {size}, {size}] "
                f"(use MMGEMProcessor to prepare images); got {shape}."
            )
        if not pixel_values.is_floating_point():
            raise TypeError(f"`pixel_values` must be a float tensor (use MMGEMProcessor); got {pixel_values.dtype}.")
        if pixel_values.shape[0] == 0:
            raise ValueError("`pixel_values` has no images (batch size 0); give at least one image.")
        if check_values and not _skip_value_checks() and not torch.isfinite(pixel_values).all():
            raise ValueError("`pixel_values` contains NaN or inf (use MMGEMProcessor to prepare images).")

    def _vision_feature_map(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the vision tower once on checked `pixel_values`: patch tokens [B, g*g, C], feature map [B, C, g, g]."""
        self._check_pixel_values(pixel_values)
        patch_tokens, feature_map, _ = self._run_vision_tower(pixel_values)
        return patch_tokens, feature_map

    def _run_vision_tower(
        self, pixel_values: torch.Tensor, output_hidden_states: Any = False, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Patch tokens [B, g*g, C], the feature map [B, C, g, g] and the tower's own output (`pixel_values`
        checked by the caller)."""
        dtype = next(self.vision_model.parameters()).dtype
        flags = self._output_kwargs(output_hidden_states, output_attentions)
        tower_output = self.vision_model(pixel_values=pixel_values.to(dtype), return_dict=True, **flags)
        hidden = tower_output.last_hidden_state  # [B, P + g*g, C]
        num_patches = self.config.patch_grid_size**2
        patch_tokens = hidden[:, -num_patches:]  # drop CLS / register tokens, which come first
        if self.config.vision_output_needs_norm:
            patch_tokens = self._vision_post_layernorm()(patch_tokens)
        return patch_tokens, self.pool_aggregator.to_feature_map(patch_tokens), tower_output

    def _output_flag(self, name: str, value: Any) -> Any:
        """An `output_hidden_states` / `output_attentions` / `return_dict` argument, else the config's value.
        (`output_hidden_states` may also be a list of layer indices, which the sub-models take as it is.)"""
        if value is not None:
            return value
        return bool(getattr(self.config, name, name == "return_dict"))

    @staticmethod
    def _output_kwargs(output_hidden_states: Any, output_attentions: Any) -> dict[str, Any]:
        """The output switches to pass to a sub-model: only those that are on (a sub-model then uses its defaults)."""
        flags = {}
        if output_hidden_states is not None and output_hidden_states is not False:
            flags["output_hidden_states"] = output_hidden_states
        if output_attentions:
            flags["output_attentions"] = True
        return flags

    def _vision_post_layernorm(self) -> nn.Module:
        tower = self.vision_model
        norm = getattr(tower, "post_layernorm", None) or getattr(tower, "vision_model", None).post_layernorm
        return norm

    def _visual_embeddings(
        self, feature_map: torch.Tensor, regions: FlatBoxes | None, include_images: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h1 embeddings [B (+R), D] of the images (if `include_images`) then of the regions (`_flatten_boxes`)."""
        vectors = [self.pool_aggregator.pool_global(feature_map)] if include_images else []
        region_index = None
        if regions is not None:
            flat_boxes, region_index = regions
            vectors.append(self.pool_aggregator.pool_regions(feature_map, flat_boxes, region_index)[1])
        return self.image_projection(torch.cat(vectors)), region_index

    def _visual_tokens(
        self, feature_map: torch.Tensor, regions: FlatBoxes | None, include_images: bool, include_regions: bool = True
    ) -> torch.Tensor:
        """h2 visual tokens [B (+R), K, H_lm] of the images (if `include_images`) then of the regions (if `regions`,
        from `_flatten_boxes`, and `include_regions`)."""
        tokens = [self.pool_aggregator.pool_grid(feature_map)] if include_images else []
        if regions is not None and include_regions:
            flat_boxes, region_index = regions
            tokens.append(self.pool_aggregator.pool_regions(feature_map, flat_boxes, region_index)[0])
        return self.visual_token_projection(torch.cat(tokens))

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        boxes: BoxesInput = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> MMGEMFeaturesOutput | tuple:
        """Image embeddings, or region embeddings when `boxes` are given.

        Args:
            pixel_values: `[B, 3, H, W]` from [`MMGEMProcessor`].
            boxes: one `[R_i, 4]` tensor per image, normalised xyxy in the frame of `pixel_values` (the processor
                converts boxes in original image pixels). Region rows are returned instead of image rows.
            output_hidden_states, output_attentions: return the vision tower's hidden states / attention weights
                (default: the config's values).
            return_dict: `False` returns a tuple (default: `config.return_dict`).

        Returns:
            [`MMGEMFeaturesOutput`] with the embeddings `[B, D]` (or `[sum R_i, D]`) in `pooler_output`, not
            normalised, as transformers' `CLIPModel.get_image_features`.
        """
        regions = self._regions(pixel_values, boxes)  # validated before the tower runs
        self._check_pixel_values(pixel_values)
        patch_tokens, feature_map, tower_output = self._run_vision_tower(
            pixel_values,
            self._output_flag("output_hidden_states", output_hidden_states),
            self._output_flag("output_attentions", output_attentions),
        )
        embeds, region_index = self._visual_embeddings(feature_map, regions, include_images=boxes is None)
        output = MMGEMFeaturesOutput(
            last_hidden_state=patch_tokens,
            pooler_output=embeds,
            hidden_states=tower_output.get("hidden_states"),
            attentions=tower_output.get("attentions"),
            region_image_index=region_index,
        )
        return output if self._output_flag("return_dict", return_dict) else output.to_tuple()

    def get_visual_tokens(self, pixel_values: torch.Tensor, boxes: BoxesInput = None) -> torch.Tensor:
        """The h2 visual tokens that replace the `<image>` placeholders: `[B, K, H_lm]`, or `[sum R_i, K, H_lm]`
        for the regions when `boxes` are given."""
        regions = self._regions(pixel_values, boxes)
        _, feature_map = self._vision_feature_map(pixel_values)
        return self._visual_tokens(feature_map, regions, include_images=boxes is None)

    def _regions(self, pixel_values: Any, boxes: BoxesInput, check_values: bool = True) -> FlatBoxes | None:
        """`boxes` flattened on the model's device (None without boxes), checked against the images."""
        if boxes is None:
            return None
        if isinstance(boxes, torch.Tensor):
            boxes = list(boxes.unbind(0))
        batch_size = pixel_values.shape[0] if isinstance(pixel_values, torch.Tensor) else -1
        return FlatBoxes(*_flatten_boxes(boxes, batch_size, self.device, check_values))

    # ------------------------------------------------------------------ text embedding
    def _require_token_id(self, name: str) -> int:
        token_id = getattr(self.config, name)
        if token_id is None:
            raise ValueError(
                f"`config.{name}` is not set: add the MM-GEM special tokens with `add_mmgem_special_tokens(tokenizer, "
                "model)` (processing_mmgem) before using the model."
            )
        return token_id

    def _check_text_inputs(self, input_ids: Any, attention_mask: Any) -> None:
        """Validate the inputs of `get_text_features` before any work.

        Shapes and dtypes are always checked; checks that read tensor values (empty rows, the context length) only
        run eagerly, so that `torch.compile(fullgraph=True)`, `torch.export` and ONNX export see no Python branch on
        tensor values and eager steps no host-device synchronisation inside the traced core.
        """
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.ndim != 2
            or input_ids.dtype not in (torch.long, torch.int)
        ):
            raise ValueError(
                "`input_ids` must be an integer tensor of shape [batch, length]; got "
                f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}."
            )
        if attention_mask is not None and (
            not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape
        ):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(
                f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}; got {shape}."
            )
        check_token_ids(input_ids, self.config.text_config.vocab_size, "input_ids")
        if _skip_value_checks():
            return
        lengths = (
            input_ids.new_full((input_ids.shape[0],), input_ids.shape[1])
            if attention_mask is None
            else (attention_mask.bool().sum(dim=1))
        )
        if (lengths == 0).any():
            raise ValueError(
                f"`input_ids` has empty rows (no attended token): {torch.where(lengths == 0)[0].tolist()}."
            )
        context = getattr(self.config.text_config, "max_position_embeddings", None)
        if context is not None and int(lengths.max()) + 1 > context:
            emb_id = self._require_token_id("emb_token_id")
            _, _, with_emb = self._embedding_inputs(input_ids, attention_mask, emb_id)
            if int(with_emb.max()) > context:
                raise ValueError(
                    f"`input_ids` has {int(with_emb.max())} tokens with `[EMB]`, more than the language model's "
                    f"context of {context}; truncate the text (MMGEMProcessor(..., truncation=True) does it)."
                )

    @staticmethod
    def _right_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] where each input position goes when the real tokens move to the front of their row, in order,
        padding behind them: a permutation given by running counts (what a stable sort on "is padding" gives,
        without the sort)."""
        mask = attention_mask.bool()  # [B, L]
        lengths = mask.sum(dim=1)  # [B]
        real_rank = mask.long().cumsum(dim=1) - 1  # [B, L]
        pad_rank = (~mask).long().cumsum(dim=1) - 1  # [B, L]
        return torch.where(mask, real_rank, lengths[:, None] + pad_rank)  # [B, L]

    def _embedding_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, emb_id: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-pad the rows and make each end with `[EMB]` (appended when the caller did not).

        Whatever the caller's padding side, every row becomes `tokens [EMB] pad...`, so the causal LM gives
        the same hidden state at `[EMB]` for left or right padding, alone or in any batch. Branch-free and of static
        output width `L + 1` (no value-dependent shape), so it traces for torch.compile and ONNX.

        Returns:
            input_ids [B, L + 1], attention_mask [B, L + 1], lengths [B] (the `[EMB]` position is lengths - 1).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = attention_mask.bool().sum(dim=1)  # [B]
        destination = self._right_padded_positions(attention_mask)  # [B, L]
        ids = torch.empty_like(input_ids).scatter(1, destination, input_ids)  # [B, L]
        last = ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)  # [B]
        needs_emb = last != emb_id  # [B]
        pad_id = self.config.text_config.pad_token_id
        pad_id = pad_id if isinstance(pad_id, int) else 0
        ids = F.pad(ids, (0, 1), value=pad_id)  # [B, L + 1]
        positions = torch.arange(ids.shape[1], device=ids.device)[None, :]  # [1, L + 1]
        append = needs_emb[:, None] & (positions == lengths[:, None])  # [B, L + 1]
        ids = torch.where(append, torch.full_like(ids, emb_id), ids)
        lengths = lengths + needs_emb.long()
        new_mask = positions < lengths[:, None]  # [B, L + 1]
        ids = torch.where(new_mask, ids, torch.full_like(ids, pad_id))  # clean padding
        return ids, new_mask.long(), lengths

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> MMGEMFeaturesOutput | tuple:
        """Text embeddings: h3 of the language model's last hidden state at `[EMB]`.

        Traceable: `torch.compile(model.get_text_features, fullgraph=True)` and ONNX export (`mmgem export-onnx`)
        work; input checks that read tensor values run only eagerly.

        Args:
            input_ids: `[B, L]` token ids, left or right padded, with or without a final `[EMB]` (appended here
                when missing).
            attention_mask: `[B, L]`, 1 for real tokens.
            output_hidden_states, output_attentions: return the language model's hidden states / attention weights
                (default: the config's values).
            return_dict: `False` returns a tuple (default: `config.return_dict`).

        Returns:
            [`MMGEMFeaturesOutput`] with the embeddings `[B, D]` in `pooler_output` (not normalised) and the LM's last
            hidden states `[B, L, H]` at the positions of `input_ids` in `last_hidden_state` (and in each of
            `hidden_states`). `attentions` are those of the sequence the LM reads: `tokens [EMB] padding`, right
            padded, `L + 1` wide.
        """
        self._check_text_inputs(input_ids, attention_mask)
        return self._text_features(input_ids, attention_mask, output_hidden_states, output_attentions, return_dict)

    def _text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> MMGEMFeaturesOutput | tuple:
        """`get_text_features` on inputs already checked (by it, or by the processor for a training step)."""
        emb_id = self._require_token_id("emb_token_id")
        ids, mask, lengths = self._embedding_inputs(input_ids, attention_mask, emb_id)
        position_ids = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)  # [B, L + 1]
        context = getattr(self.config.text_config, "max_position_embeddings", None)
        if context is not None:
            position_ids = position_ids.clamp(max=context - 1)  # only the padding column can pass the context
        flags = self._output_kwargs(
            self._output_flag("output_hidden_states", output_hidden_states),
            self._output_flag("output_attentions", output_attentions),
        )
        decoder_output = self.get_decoder()(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False, return_dict=True, **flags
        )
        hidden = decoder_output.last_hidden_state  # [B, L + 1, H]
        at_emb = hidden.gather(1, (lengths - 1)[:, None, None].expand(-1, 1, hidden.shape[-1])).squeeze(1)  # [B, H]
        # Back to the caller's token positions: [B, L, H] aligned with `input_ids`, whatever its padding side.
        positions = self._right_padded_positions(
            attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        )[..., None].expand(-1, -1, hidden.shape[-1])  # [B, L, H]
        hidden_states = decoder_output.get("hidden_states")
        output = MMGEMFeaturesOutput(
            last_hidden_state=hidden.gather(1, positions),
            pooler_output=self.text_projection(at_emb),
            hidden_states=None if hidden_states is None else tuple(h.gather(1, positions) for h in hidden_states),
            attentions=decoder_output.get("attentions"),
        )
        return output if self._output_flag("return_dict", return_dict) else output.to_tuple()

    # ------------------------------------------------------------------ captioning inputs
    def _merge_visual_tokens(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, visual_tokens: torch.Tensor | None
    ) -> torch.Tensor:
        """Token embeddings with the `<image>` placeholders replaced by `visual_tokens` [N_vis, K, H]."""
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # [N, L, H]
        placeholders = self._placeholder_mask(input_ids, inputs_embeds)
        if placeholders is None:
            return inputs_embeds
        if self._checks_values() and placeholders.shape[1] > 1:
            # Checked on prompts only: a decoding step (one new token, no placeholder) must not wait for the device.
            self._check_placeholders(placeholders, visual_tokens)
        if visual_tokens is None:
            return inputs_embeds
        # No branch on the placeholder count: with none (decoding steps) masked_scatter changes nothing.
        return inputs_embeds.masked_scatter(placeholders[..., None], visual_tokens.to(inputs_embeds.dtype))

    def _placeholder_mask(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor | None:
        """[N, L] True at the `<image>` placeholders: the `<image>` id in `input_ids`, or, when only `inputs_embeds`
        are given, the rows equal to the `<image>` token's embedding (as transformers' LLaVA finds them)."""
        image_id = self.config.image_token_id
        if image_id is None:
            return None
        if input_ids is not None:
            return input_ids == image_id
        if inputs_embeds is None:
            return None
        image_embedding = self.get_input_embeddings()(torch.tensor(image_id, device=inputs_embeds.device))  # [H]
        return (inputs_embeds == image_embedding.to(inputs_embeds.dtype)).all(dim=-1)

    def _check_placeholders(self, placeholders: torch.Tensor, visual_tokens: torch.Tensor | None) -> None:
        """The `<image>` placeholders [N, L] must match the visual tokens [N_vis, K, H] one to one."""
        count = int(placeholders.sum())
        if count and visual_tokens is None:
            raise ValueError(
                "`input_ids` contains `<image>` placeholders but neither `pixel_values` nor `visual_tokens` were given."
            )
        expected = 0 if visual_tokens is None else visual_tokens.shape[0] * visual_tokens.shape[1]
        if count and count != expected:
            raise ValueError(
                f"`input_ids` has {count} `<image>` placeholders but {visual_tokens.shape[0]} "
                f"images/regions x {visual_tokens.shape[1]} visual tokens = {expected} were computed; each sequence "
                f"needs exactly {self.config.num_image_tokens} placeholders per image or region."
            )

    @staticmethod
    def _check_caption_rows(
        caption_rows: CaptionRows | None, num_rows: int, batch_size: int, num_regions: int | None
    ) -> CaptionRows:
        """The layout of the caption rows (`caption_rows`, which is required with boxes; `num_regions` is None
        without boxes), checked against the number of caption sequences."""
        if caption_rows is None:
            if num_regions is not None:
                raise ValueError(
                    "`caption_rows` must say what the caption sequences of `input_ids` are when `boxes` are given: "
                    "'images', 'regions' or 'images_and_regions' (MMGEMProcessor sets it)."
                )
            caption_rows = "images"
        if caption_rows not in CAPTION_ROWS:
            raise ValueError(f"`caption_rows` must be one of {CAPTION_ROWS}; got {caption_rows!r}.")
        if caption_rows != "images" and num_regions is None:
            raise ValueError(f"`caption_rows={caption_rows!r}` needs `boxes`.")
        num_regions = num_regions or 0
        expected = {"images": batch_size, "regions": num_regions, "images_and_regions": batch_size + num_regions}
        if num_rows != expected[caption_rows]:
            raise ValueError(
                f"`input_ids` has {num_rows} caption sequences with `<image>` placeholders, but "
                f"`caption_rows={caption_rows!r}` with {batch_size} images and {num_regions} regions needs "
                f"{expected[caption_rows]}."
            )
        return caption_rows

    def _default_caption_prompt(self, num_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`<bos> <image>*K [CAP]` for each row: the prompt `generate` uses when none is given."""
        image_id = self._require_token_id("image_token_id")
        cap_id = self._require_token_id("cap_token_id")
        bos = self.config.text_config.bos_token_id
        prompt = ([bos] if isinstance(bos, int) else []) + [image_id] * self.config.num_image_tokens + [cap_id]
        input_ids = torch.tensor(prompt, device=device).repeat(num_rows, 1)
        return input_ids, torch.ones_like(input_ids)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        boxes: BoxesInput = None,
        text_input_ids: torch.LongTensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        visual_tokens: torch.FloatTensor | None = None,
        cache: Any | None = None,
        past_key_values: Any | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_loss: bool = True,
        caption_rows: CaptionRows | None = None,
        text_keys: torch.LongTensor | None = None,
        image_keys: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> MMGEMOutput | tuple:
        r"""
        The joint training step, and the captioning forward that `generate` calls.

        Args:
            input_ids (`[N, L]`, *optional*): caption sequences `<bos> <image>*K [CAP] caption <eos>`: one per image,
                one per region, or one per image then one per region, as `caption_rows` says.
            attention_mask (`[N, L]`, *optional*): mask of `input_ids`.
            position_ids (`[N, L]`, *optional*): derived from `attention_mask` when missing (left padding works).
            pixel_values (`[B, 3, H, W]`, *optional*): images; one vision forward feeds both objectives.
            boxes (list of `[R_i, 4]`, *optional*): normalised xyxy region boxes per image.
            text_input_ids (`[B (+R), T]`, *optional*): texts `<bos> text [EMB]` matched row by row to the images
                (then the regions) for the contrastive loss.
            text_attention_mask (`[B (+R), T]`, *optional*): mask of `text_input_ids`.
            labels (`[N, L]`, *optional*): caption targets aligned with `input_ids`, `-100` outside the caption.
            visual_tokens (`[N_vis, K, H_lm]`, *optional*): precomputed h2 outputs (used by `generate`).
            cache / past_key_values (*optional*): the language model's KV cache (the name depends on the
                transformers release).
            inputs_embeds (`[N, L, H_lm]`, *optional*): instead of `input_ids` for the caption sequence. Without
                `input_ids`, the rows equal to the `<image>` token's embedding are the placeholders (as in LLaVA).
            use_cache (`bool`, *optional*): return the KV cache.
            logits_to_keep (`int` or tensor): as in transformers' causal LMs.
            return_loss (`bool`, defaults to `True`): compute the losses whose inputs are present.
            caption_rows (`str`, *optional*): what the caption sequences with `<image>` placeholders are:
                `"images"` (the default without `boxes`), `"regions"` (regions of image 0 first) or
                `"images_and_regions"` (one per image, then one per region). Required with `boxes`; MMGEMProcessor
                sets it.
            text_keys (`[B (+R)]`, *optional*): with `config.mask_false_negatives`, one integer key per text row
                (e.g. a hash of the normalised text, as `MMGEMCollator` gives): rows with equal keys are not
                negatives of each other in the contrastive loss. Default: identical token sequences share a key.
            image_keys (`[B]`, *optional*): likewise per image (e.g. the source image); default: bit-identical
                pixel values share a key. Region rows never share an image key.
            shift_labels (`[N, L]`, *optional*): caption targets already shifted left by one (position t predicts
                `shift_labels[:, t]`), as transformers' causal LMs take them; used instead of `labels`.
            output_hidden_states, output_attentions (`bool`, *optional*): return the language model's (and, in
                `image_outputs`, the vision tower's) hidden states / attention weights; default: the config's.
            return_dict (`bool`, *optional*): `False` returns a tuple of the outputs present (default:
                `config.return_dict`).
        """
        if past_key_values is not None and CACHE_NAME == "cache" and not _skip_value_checks():
            warnings.warn(
                "`past_key_values` is deprecated for `MMGEMModel.forward` with this transformers release: use `cache`.",
                FutureWarning,
                stacklevel=2,
            )
        cache = cache if cache is not None else past_key_values
        output_hidden_states = self._output_flag("output_hidden_states", output_hidden_states)
        output_attentions = self._output_flag("output_attentions", output_attentions)
        check_values = self._checks_values()  # not in a training step: see `_checks_values`
        regions, caption_rows, needs_visual_tokens = self._forward_layout(
            input_ids, inputs_embeds, pixel_values, boxes, text_input_ids, visual_tokens, caption_rows, check_values
        )

        # One vision forward feeds both objectives.
        output = MMGEMOutput()
        feature_map = tower_output = None
        if pixel_values is not None and (text_input_ids is not None or needs_visual_tokens):
            _, feature_map, tower_output = self._run_vision_tower(pixel_values, output_hidden_states, output_attentions)
        losses = []
        if text_input_ids is not None:
            row_keys = (text_keys, image_keys)
            loss = self._contrastive_step(
                output, feature_map, regions, pixel_values, text_input_ids, text_attention_mask, row_keys, check_values
            )
            if return_loss:
                output.loss_contrastive = loss
                losses.append(self.config.contrastive_loss_weight * loss)
        if input_ids is not None or inputs_embeds is not None:
            if needs_visual_tokens:
                with_images, with_regions = caption_rows != "regions", caption_rows != "images"
                visual_tokens = self._visual_tokens(feature_map, regions, with_images, with_regions)
            flags = self._output_kwargs(output_hidden_states, output_attentions)
            lm_inputs = {"use_cache": use_cache, "logits_to_keep": logits_to_keep, self._lm_cache_argument: cache}
            self._caption_step(
                output,
                input_ids,
                inputs_embeds,
                attention_mask,
                position_ids,
                visual_tokens,
                {**lm_inputs, **flags, **kwargs},
            )
            if (labels is not None or shift_labels is not None) and return_loss:
                output.loss_caption = self._caption_loss(output.logits, labels, shift_labels)
                losses.append(self.config.caption_loss_weight * output.loss_caption)
        elif labels is not None or shift_labels is not None:
            raise ValueError("`labels` / `shift_labels` need the caption sequences (`input_ids` or `inputs_embeds`).")

        if losses:
            output.loss = torch.stack(losses).sum()
        # Rebuilt so that the fields (and a tuple output) follow the declared order, loss first: a ModelOutput
        # otherwise keeps them in the order they were set.
        output = MMGEMOutput(**dict(output.items()), image_outputs=tower_output)
        return output if self._output_flag("return_dict", return_dict) else output.to_tuple()

    def _forward_layout(
        self,
        input_ids: Any,
        inputs_embeds: Any,
        pixel_values: Any,
        boxes: BoxesInput,
        text_input_ids: Any,
        visual_tokens: Any,
        caption_rows: CaptionRows | None,
        check_values: bool,
    ) -> tuple[FlatBoxes | None, CaptionRows | None, bool]:
        """Check how `forward`'s inputs fit together, before any work: the flattened regions, the layout of the
        caption rows, and whether the caption sequences take visual tokens from `pixel_values`. Values are read only
        with `check_values` (see `_checks_values`)."""
        if check_values and isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2:
            check_token_ids(input_ids, self.config.text_config.vocab_size, "input_ids")
        has_captions = input_ids is not None or inputs_embeds is not None
        has_texts = text_input_ids is not None
        regions, batch_size = None, 0
        if pixel_values is not None:
            self._check_pixel_values(pixel_values, check_values)
            batch_size = pixel_values.shape[0]
            regions = self._regions(pixel_values, boxes, check_values)
        elif has_texts:
            raise ValueError("`text_input_ids` are given without `pixel_values`: the contrastive loss needs both.")
        num_regions = 0 if regions is None else regions.boxes.shape[0]
        if has_texts and text_input_ids.shape[0] != batch_size + num_regions:
            raise ValueError(
                f"`text_input_ids` has {text_input_ids.shape[0]} rows; expected one per image then one per region "
                f"({batch_size} + {num_regions})."
            )
        placeholders = self._placeholder_mask(input_ids, inputs_embeds) if visual_tokens is None else None
        if check_values:
            needs_visual_tokens = placeholders is not None and bool(placeholders.any())
        else:  # a training batch: every caption sequence of the processor starts with its placeholders
            needs_visual_tokens = placeholders is not None and pixel_values is not None
        source = "input_ids" if input_ids is not None else "inputs_embeds"
        if needs_visual_tokens and pixel_values is None:
            raise ValueError(f"`{source}` contains `<image>` placeholders but `pixel_values` is missing.")
        if needs_visual_tokens:
            num_rows = int(placeholders.any(dim=1).sum()) if check_values else placeholders.shape[0]
            region_count = None if regions is None else num_regions
            caption_rows = self._check_caption_rows(caption_rows, num_rows, batch_size, region_count)
        elif pixel_values is not None and has_captions and not has_texts and visual_tokens is None:
            # The images would be dropped silently: a caption sequence takes them only through its placeholders.
            raise ValueError(
                f"`pixel_values` are given but `{source}` holds no `<image>` placeholder to take them: start each "
                f"caption sequence with {self.config.num_image_tokens} `<image>` tokens (MMGEMProcessor writes "
                "them), or, with `inputs_embeds`, the `<image>` token's embedding at those positions."
            )
        return regions, caption_rows, needs_visual_tokens

    def _contrastive_step(
        self,
        output: MMGEMOutput,
        feature_map: torch.Tensor,
        regions: FlatBoxes | None,
        pixel_values: torch.Tensor,
        text_input_ids: torch.Tensor,
        text_attention_mask: torch.Tensor | None,
        row_keys: tuple[torch.Tensor | None, torch.Tensor | None],
        check_values: bool,
    ) -> torch.Tensor:
        """L_Emb: image (then region) rows h1 against their texts' h3 at `[EMB]`; fills the embeddings and logits of
        `output` and returns the loss. `row_keys`: the caller's (text_keys, image_keys), or None each."""
        image_embeds, _ = self._visual_embeddings(feature_map, regions, include_images=True)  # [B + R, D]
        if check_values:
            self._check_text_inputs(text_input_ids, text_attention_mask)
        text_embeds = self._text_features(text_input_ids, text_attention_mask, return_dict=True).pooler_output
        output.image_embeds = F.normalize(image_embeds.float(), dim=-1)
        output.text_embeds = F.normalize(text_embeds.float(), dim=-1)
        keys = None
        if self.config.mask_false_negatives:
            num_regions = 0 if regions is None else regions.boxes.shape[0]
            keys = self._false_negative_keys(pixel_values, text_input_ids, text_attention_mask, num_regions, *row_keys)
        loss, output.logits_per_image, output.logits_per_text = contrastive_loss(
            output.image_embeds, output.text_embeds, self.logit_scale(), keys
        )
        return loss

    def _caption_step(
        self,
        output: MMGEMOutput,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        visual_tokens: torch.Tensor | None,
        lm_kwargs: dict[str, Any],
    ) -> None:
        """The language model over the caption sequences, `<image>` placeholders replaced by `visual_tokens`; fills
        the logits, hidden states, attentions and cache of `output`."""
        embeds = self._merge_visual_tokens(input_ids, inputs_embeds, visual_tokens)
        cache = lm_kwargs.get(self._lm_cache_argument)
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2 and cache is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding starts at 0
        lm_output = self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            return_dict=True,
            **lm_kwargs,
        )
        output.logits = lm_output.logits
        output.hidden_states = lm_output.get("hidden_states")
        output.attentions = lm_output.get("attentions")
        setattr(output, CACHE_NAME, lm_output.get(self._lm_cache_argument))

    @staticmethod
    def _caption_loss(
        logits: torch.Tensor, labels: torch.Tensor | None, shift_labels: torch.Tensor | None
    ) -> torch.Tensor:
        """L_Gen over the caption tokens (`labels`, or `shift_labels` already shifted), shapes checked first."""
        for name, targets in (("labels", labels), ("shift_labels", shift_labels)):
            if targets is not None and targets.shape != logits.shape[:2]:
                expected, got = tuple(logits.shape[:2]), tuple(targets.shape)
                raise ValueError(f"`{name}` must have the shape of `input_ids` {expected}; got {got}.")
        return caption_loss(logits, labels, shift_labels)

    @staticmethod
    def _false_negative_keys(
        pixel_values: torch.Tensor,
        text_input_ids: torch.Tensor,
        text_attention_mask: torch.Tensor | None,
        num_regions: int,
        text_keys: torch.Tensor | None,
        image_keys: torch.Tensor | None,
    ) -> list[torch.Tensor]:
        """The row keys of the contrastive loss: a text key per row, and an image key per row (NO_KEY for regions)."""
        rows = text_input_ids.shape[0]
        if text_keys is None:
            text_keys = token_row_keys(text_input_ids, text_attention_mask)
        if image_keys is None:
            image_keys = pixel_row_keys(pixel_values)
        text_keys = torch.as_tensor(text_keys, dtype=torch.long, device=text_input_ids.device).reshape(-1)
        image_keys = torch.as_tensor(image_keys, dtype=torch.long, device=text_input_ids.device).reshape(-1)
        if text_keys.shape[0] != rows or image_keys.shape[0] != rows - num_regions:
            raise ValueError(
                f"`text_keys` needs one key per text row ({rows}) and `image_keys` one per image "
                f"({rows - num_regions}); got {text_keys.shape[0]} and {image_keys.shape[0]}."
            )
        region_keys = torch.full((num_regions,), NO_KEY, dtype=torch.long, device=image_keys.device)
        return [text_keys, torch.cat([image_keys, region_keys])]

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        boxes: BoxesInput = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Caption images, or with `boxes` their regions, through `GenerationMixin.generate`.

        The vision tower runs once here and its pooled, projected tokens travel as `visual_tokens`, so beam search
        and sampling expand them like any other input and the tower is not re-run per beam or per step. Without
        `input_ids`, the prompt `<bos> <image>*K [CAP]` is built for each image (or region). All other arguments
        (`max_new_tokens`, `num_beams`, `do_sample`, `generation_config`, ...) are those of `generate`; like a causal
        LM, the returned ids start with the prompt (use `MMGEMProcessor.decode_captions`).
        """
        kwargs.pop("caption_rows", None)  # the prompt rows are the images, or the regions with `boxes`
        if pixel_values is not None and kwargs.get("visual_tokens") is None:
            kwargs["visual_tokens"] = self.get_visual_tokens(pixel_values, boxes)  # checks images and boxes once
        special_ids = [self.config.image_token_id, self.config.emb_token_id, self.config.cap_token_id]
        if "suppress_tokens" not in kwargs and not self.generation_config.suppress_tokens:
            # A caption never contains MM-GEM's special tokens; a generated `<image>` would also read as a placeholder.
            kwargs["suppress_tokens"] = [i for i in special_ids if i is not None]
        length_given = any(k in kwargs for k in ("max_new_tokens", "max_length", "generation_config"))
        config = self.generation_config
        if not length_given and config.max_new_tokens is None and config.max_length in (None, 20):
            # transformers' default total length (20, or prompt + 20) would cut captions after the K visual tokens.
            kwargs["max_new_tokens"] = DEFAULT_MAX_CAPTION_TOKENS
        inputs_embeds = kwargs.get("inputs_embeds")
        if input_ids is None and inputs_embeds is not None and kwargs.get("visual_tokens") is not None:
            # The images reach the prompt only through its `<image>` rows: refuse rather than caption without them.
            placeholders = self._placeholder_mask(None, inputs_embeds)
            if placeholders is None or not bool(placeholders.any()):
                raise ValueError(
                    "`inputs_embeds` holds no `<image>` placeholder rows to take the images of `pixel_values`: put "
                    "the `<image>` token's embedding (`model.get_input_embeddings()(image_token_id)`) at the "
                    f"{self.config.num_image_tokens} visual positions of each prompt, or pass `input_ids`."
                )
        if input_ids is None and inputs_embeds is None:
            if kwargs.get("visual_tokens") is None:
                raise ValueError("`generate` needs `pixel_values` (or `visual_tokens`) or `input_ids`.")
            input_ids, attention_mask = self._default_caption_prompt(kwargs["visual_tokens"].shape[0], self.device)
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


# Folders saved before the temperature had shape (1,) load through `from_pretrained` too.
register_checkpoint_upgrades(("MMGEMModel",))
# `save_pretrained` writes `auto_map` and copies this file (and its relative imports) next to the weights.
MMGEMModel.register_for_auto_class("AutoModel")
if __name__ == "modeling_mmgem.modeling_mmgem":
    # Imported from the installed mmgem package (not as a Hub copy): register with the Auto classes.
    AutoModel.register(MMGEMConfig, MMGEMModel, exist_ok=True)
    AutoModelForImageTextToText.register(MMGEMConfig, MMGEMModel, exist_ok=True)

__all__ = ["MMGEMModel", "MMGEMPreTrainedModel", "MMGEMOutput", "MMGEMFeaturesOutput"]
