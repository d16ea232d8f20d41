"""Processor of MM-GEM: images, texts and region boxes to model inputs, and captions back to text.

This file is remote code: it travels to the Hub next to the weights and imports only torch, transformers and their
own dependencies (numpy, PIL).
"""

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs

from .image_loading_mmgem import FrameSettings, boxes_to_model_frame, image_frame_transform, load_rgb_image

try:  # transformers 5: image processors on the PIL backend
    from transformers.image_processing_backends import PilBackend
except ImportError:  # pragma: no cover - an older transformers: every image goes through the image processor
    PilBackend = None

EMB_TOKEN = "[EMB]"
CAP_TOKEN = "[CAP]"
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
IGNORE_INDEX = -100
IMAGE_PROCESSOR_BACKENDS = ("pil", "torchvision")
# `padding` values that pad to the longest row (a batch is always padded to one width: the ids are tensors).
PAD_TO_LONGEST = (None, False, True, "longest", "do_not_pad")


class MMGEMImagesKwargs(ImagesKwargs, total=False):
    """The image options of `MMGEMProcessor.__call__`: those of the image processor (`do_rescale`, `do_normalize`,
    `image_mean`, ...), `allow_image_references`: whether strings may be opened as files / URLs (see
    `load_rgb_image`; sentence-transformers' module config sets it to False), and `image_url_timeout`: seconds a URL
    download may take (default `MMGEM_IMAGE_URL_TIMEOUT`; the pipelines' `timeout`)."""

    allow_image_references: bool
    image_url_timeout: float


class MMGEMProcessorKwargs(ProcessingKwargs, total=False):
    """The keyword arguments `MMGEMProcessor.__call__` takes, merged by transformers' `ProcessorMixin._merge_kwargs`
    (flat, per modality in `text_kwargs` / `images_kwargs`, or in `common_kwargs`; one passed twice is an error)."""

    images_kwargs: MMGEMImagesKwargs
    _defaults = {"text_kwargs": {"padding": "longest"}, "common_kwargs": {"return_tensors": "pt"}}


# The chat form of captioning (transformers' image-text-to-text pipeline, `apply_chat_template`): a user message
# holding ONE image becomes the caption prompt; MM-GEM takes no instruction, so text in a user or system message is
# refused rather than ignored; a final assistant message (`continue_final_message=True`) is the caption's beginning.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set parts = message['content'] if message['content'] is not string "
    "else [{'type': 'text', 'text': message['content']}] -%}"
    "{%- for part in parts -%}"
    "{%- if message['role'] == 'assistant' and part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] == 'image' -%}<image>[CAP]"
    "{%- elif part['type'] == 'text' and part['text'] | trim -%}"
    "{{ raise_exception('MM-GEM captions images without an instruction: put only the image in the user message "
    "(text in a user or system message is not supported; an assistant message can start the caption).') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endfor -%}"
)


# ---------------------------------------------------------------------------------------------- special tokens
def add_mmgem_special_tokens(tokenizer: Any, model: Any | None = None) -> dict[str, int]:
    """Add `[EMB]`, `[CAP]`, `<image>` (and a pad token if missing) to `tokenizer`; update `model` to match.

    With `model`, the token embeddings are resized to the new vocabulary and the config / generation config get the
    new token ids. Idempotent. The original rows are unchanged; the new rows, input and output embeddings alike (tied
    or not), start at the mean of the vocabulary's rows (transformers' `mean_resizing=True`: a sample of the old rows'
    mean and covariance scaled by 1e-9), so a pretrained LM keeps its text predictions (a new token's logit is the
    vocabulary's mean logit) and training starts the new tokens from inside the vocabulary's distribution.

    Returns:
        The ids: `{"emb_token_id", "cap_token_id", "image_token_id", "pad_token_id"}`.
    """
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    missing = [t for t in (EMB_TOKEN, CAP_TOKEN, IMAGE_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = {
        "emb_token_id": tokenizer.convert_tokens_to_ids(EMB_TOKEN),
        "cap_token_id": tokenizer.convert_tokens_to_ids(CAP_TOKEN),
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "pad_token_id": tokenizer.pad_token_id,
    }
    if model is not None:
        embeddings = model.get_input_embeddings().weight
        if embeddings.shape[0] < len(tokenizer):
            # A model built on the meta device (a skeleton whose weights are loaded later) has no rows to average.
            model.resize_token_embeddings(len(tokenizer), mean_resizing=embeddings.device.type != "meta")
        text_config = model.config.text_config
        text_config.pad_token_id = ids["pad_token_id"]
        for name in ("emb_token_id", "cap_token_id", "image_token_id"):
            setattr(model.config, name, ids[name])
        model.config.check_token_ids()
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.pad_token_id = ids["pad_token_id"]
            generation_config.bos_token_id = tokenizer.bos_token_id
            generation_config.eos_token_id = tokenizer.eos_token_id
        text_config.bos_token_id = tokenizer.bos_token_id
        text_config.eos_token_id = tokenizer.eos_token_id
    return ids


def _as_text_list(texts: Any, argument: str, allow_empty: bool = False) -> list[str]:
    """`texts` as a list of strings: one string or a list / tuple of strings, else a TypeError naming `argument`."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"`{argument}` must be a string or a list of strings; got {type(texts).__name__}.")
    if not texts and not allow_empty:
        raise ValueError(f"`{argument}` must hold at least one string; got an empty {type(texts).__name__}.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"`{argument}[{i}]` must be a non-empty string; got {type(text).__name__} {text!r}.")
    return list(texts)


# ---------------------------------------------------------------------------------------------- processor
def image_processor_with_backend(image_processor: Any, backend: str) -> Any:
    """`image_processor` as its `backend` implementation ("pil": `CLIPImageProcessorPil`, "torchvision":
    `CLIPImageProcessor`), with the same settings; unchanged if it already is one, or has no such sibling class.

    transformers saves both implementations under the same `image_processor_type` (without the Pil suffix) and picks
    torchvision on reload wherever it is installed: this puts the implementation back that was used in training.
    """
    if image_processor is None or not hasattr(image_processor, "to_dict"):
        return image_processor
    is_pil = type(image_processor).__name__.endswith("Pil")
    if is_pil == (backend == "pil"):
        return image_processor
    settings = image_processor.to_dict()
    base_name = settings.pop("image_processor_type", type(image_processor).__name__).removesuffix("Pil")
    target = get_image_processor_class_from_name(base_name + "Pil" if backend == "pil" else base_name)
    if target is None or getattr(target, "is_dummy", False) or type(image_processor) is target:
        return image_processor
    return target(**settings)


class MMGEMProcessor(ProcessorMixin):
    r"""
    Prepares MM-GEM inputs: images (PIL in any mode, numpy arrays, tensors), texts, and region boxes given in
    ORIGINAL image pixels (converted through the image processor's resize and crop to the model's frame).

    Calls:
        - `processor(text=...)`: embedding inputs `<bos> text [EMB]` (`input_ids`, `attention_mask`) for
          `get_text_features`.
        - `processor(images=...)`: `pixel_values` plus the caption prompt `<bos> <image>*K [CAP]` for `generate`;
          with `boxes`, also normalised `boxes`, one prompt per region and `caption_rows="regions"`.
        - `processor(images=..., text=captions)`: a training batch for `forward` (contrastive and caption loss);
          with `boxes` and `region_text`, regions join both objectives (`caption_rows="images_and_regions"`).

    Args:
        image_processor: a transformers image processor (CLIP or SigLIP).
        tokenizer: a tokenizer that has the MM-GEM special tokens (see `add_mmgem_special_tokens`).
        num_image_tokens (`int`): `K`, visual tokens per image or region (`config.num_image_tokens`).
        context_length (`int`, *optional*): longest sequence the language model takes (its context); texts longer
            than it are refused, or cut with `truncation=True`. (Folders saved before name it `max_length`.)
        image_processing_backend (`str`, *optional*, defaults to `"pil"`): the image processor implementation,
            `"pil"` or `"torchvision"`. It is saved with the processor, and a processor of the other implementation
            (e.g. the torchvision one that transformers picks on reload wherever torchvision is installed) is turned
            into this one, so the pixels a model sees do not depend on which libraries happen to be installed.
    """

    attributes = ["image_processor", "tokenizer"]
    valid_processor_kwargs = MMGEMProcessorKwargs

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int = 16,
        context_length: int | None = None,
        chat_template: str | None = None,
        image_processing_backend: str = "pil",
        **kwargs: Any,
    ) -> None:
        # `max_length` is the tokenizer's per-call option; processors saved before took the context under that name.
        if context_length is None and "max_length" in kwargs:
            context_length = kwargs.pop("max_length")
        if image_processing_backend not in IMAGE_PROCESSOR_BACKENDS:
            raise ValueError(
                f"`image_processing_backend` must be one of {IMAGE_PROCESSOR_BACKENDS}; "
                f"got {image_processing_backend!r}."
            )
        self.num_image_tokens = num_image_tokens
        self.context_length = context_length
        self.image_token = IMAGE_TOKEN  # the placeholder token, as transformers' vision-language processors name it
        self.image_processing_backend = image_processing_backend
        image_processor = image_processor_with_backend(image_processor, image_processing_backend)
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)

    # ------------------------------------------------------------------ tokens
    def _special_ids(self) -> dict[str, int]:
        """The ids of `[EMB]`, `[CAP]`, `<image>` and the pad token; looked up once per tokenizer state (adding
        tokens or changing the pad token looks them up again), since every call of the processor needs them."""
        tokenizer = self.tokenizer
        key = (id(tokenizer), len(tokenizer), tokenizer.pad_token_id)
        cached = self.__dict__.get("_special_ids_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        tokens = (EMB_TOKEN, CAP_TOKEN, IMAGE_TOKEN)
        ids = tokenizer.convert_tokens_to_ids(list(tokens))
        unknown = tokenizer.unk_token_id
        missing = [t for t, i in zip(tokens, ids) if i is None or (i == unknown and t != tokenizer.unk_token)]
        if missing or tokenizer.pad_token_id is None:
            raise ValueError(
                f"`tokenizer` lacks the MM-GEM special tokens {missing or ['pad']}: call "
                "`add_mmgem_special_tokens(tokenizer, model)` first."
            )
        special = {"emb": ids[0], "cap": ids[1], "image": ids[2], "pad": tokenizer.pad_token_id}
        self.__dict__["_special_ids_cache"] = (key, special)  # not an __init__ argument: never saved
        return special

    def _bos(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return [bos] if bos is not None else []

    def _context_length(self, max_length: int | None) -> int | None:
        """The longest sequence to build: an explicit `max_length`, else the smaller of the language model's context
        and the tokenizer's `model_max_length` (which sentence-transformers' `max_seq_length` sets)."""
        if max_length is not None:
            return max_length
        model_max = getattr(self.tokenizer, "model_max_length", None)
        model_max = model_max if isinstance(model_max, int) and model_max < 1_000_000 else None
        limits = [n for n in (self.context_length, model_max) if n is not None]
        return min(limits) if limits else None

    def _tokenize_texts(self, texts: Sequence[str], argument: str) -> list[list[int]]:
        """Token ids of each text, read as plain text: a user's "<image>", "[EMB]" or "</s>" is spelled out in
        ordinary tokens (`split_special_tokens`), never turned into a control token."""
        texts = _as_text_list(texts, argument)
        control_ids = self._control_ids()
        for i, text in enumerate(texts):
            if not text.strip():
                raise ValueError(f"`{argument}[{i}]` must be a non-empty string; got {text!r}.")
        # One call for the whole list: a fast tokenizer encodes it as a batch, at a fraction of the per-call cost.
        token_lists = self.tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        for i, (text, tokens) in enumerate(zip(texts, token_lists)):
            if control_ids.intersection(tokens):
                # A tokenizer that ignores `split_special_tokens` (some slow ones): refuse rather than pass it on.
                raise ValueError(
                    f"`{argument}[{i}]` contains a control token (<image>, [EMB], [CAP], or the tokenizer's bos, "
                    f"eos or pad) that this tokenizer cannot spell out as text: {text[:200]!r}."
                )
        return [list(tokens) for tokens in token_lists]

    def _control_ids(self) -> set[int]:
        """The ids a text must never produce: MM-GEM's `[EMB]`, `[CAP]`, `<image>` and the tokenizer's bos / eos /
        pad, which steer the layouts. The unknown token is NOT one of them: a tokenizer without byte fallback
        (WordPiece, a Metaspace BPE) writes it for characters outside its vocabulary, and the text is then read as
        that tokenizer reads it."""
        tokenizer = self.tokenizer
        ids = set(self._special_ids().values())
        ids |= {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
        ids.discard(None)
        ids.discard(tokenizer.unk_token_id)  # a tokenizer whose pad (or eos) is its unk: unknowns are still text
        return ids

    def _fit(self, tokens: list[int], room: int | None, truncation: bool, argument: str, index: int) -> list[int]:
        if room is None or len(tokens) <= room:
            return tokens
        if truncation:
            return tokens[:room]
        raise ValueError(
            f"`{argument}[{index}]` has {len(tokens)} tokens, more than the {room} that fit the language model's "
            "context with the special tokens; pass `truncation=True` to cut it."
        )

    @staticmethod
    def _pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
        width = max(len(r) for r in rows)
        padded = [([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows]
        return torch.tensor(padded, dtype=torch.long)

    def _batch(self, rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self._pad(rows, pad_id, left)
        mask = self._pad([[1] * len(r) for r in rows], 0, left)
        return ids, mask

    def embedding_inputs(
        self, text: str | Sequence[str], truncation: bool = False, max_length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """`<bos> text [EMB]` for each text, right padded: `input_ids`, `attention_mask` [B, L]."""
        return self._embedding_rows(self._tokenize_texts(text, "text"), truncation, max_length)

    def _embedding_rows(
        self, token_lists: list[list[int]], truncation: bool, max_length: int | None
    ) -> dict[str, torch.Tensor]:
        special = self._special_ids()
        context = self._context_length(max_length)
        room = None if context is None else context - len(self._bos()) - 1
        rows = [
            self._bos() + self._fit(tokens, room, truncation, "text", i) + [special["emb"]]
            for i, tokens in enumerate(token_lists)
        ]
        input_ids, attention_mask = self._batch(rows, special["pad"])
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def caption_prompt(self, num_rows: int) -> dict[str, torch.Tensor]:
        """`<bos> <image>*K [CAP]` for each image or region: `input_ids`, `attention_mask` [N, 2 + K]."""
        special = self._special_ids()
        row = self._bos() + [special["image"]] * self.num_image_tokens + [special["cap"]]
        input_ids, attention_mask = self._batch([row] * num_rows, special["pad"], left=True)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def caption_targets(
        self, captions: Sequence[str], truncation: bool = False, max_length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """`<bos> <image>*K [CAP] caption <eos>` right padded, with `labels` on the caption and `<eos>` only."""
        return self._caption_rows(self._tokenize_texts(captions, "text"), truncation, max_length)

    def _caption_rows(
        self, token_lists: list[list[int]], truncation: bool, max_length: int | None
    ) -> dict[str, torch.Tensor]:
        special = self._special_ids()
        prompt = self._bos() + [special["image"]] * self.num_image_tokens + [special["cap"]]
        eos = self.tokenizer.eos_token_id
        tail = [eos] if eos is not None else []
        context = self._context_length(max_length)
        room = None if context is None else context - len(prompt) - len(tail)
        rows, label_rows = [], []
        for i, tokens in enumerate(token_lists):
            caption = self._fit(tokens, room, truncation, "text", i) + tail
            rows.append(prompt + caption)
            label_rows.append([IGNORE_INDEX] * len(prompt) + caption)
        input_ids, attention_mask = self._batch(rows, special["pad"])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": self._pad(label_rows, IGNORE_INDEX)}

    def _chat_prompt(self, text: Any) -> re.Match | None:
        """The parts of a prompt the chat template renders (`[<bos>]<image>[CAP]` + a caption beginning), if it is
        one. A caption never starts with `<image>[CAP]`, so training texts are never taken for prompts."""
        bos = re.escape(self.tokenizer.bos_token or "")
        pattern = f"^(?:{bos})?{re.escape(IMAGE_TOKEN + CAP_TOKEN)}(?P<caption_start>.*)$"
        return re.match(pattern, text, flags=re.DOTALL) if isinstance(text, str) else None

    def chat_prompt_inputs(
        self, images: Any, prompts: str | Sequence[str], **image_options: Any
    ) -> dict[str, torch.Tensor]:
        """Caption prompts rendered by the chat template, one image each: `pixel_values`, and `input_ids` /
        `attention_mask` (left padded) `<bos> <image>*K [CAP] caption-start` (the caption start read as plain text)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        flat = []
        for item in images if isinstance(images, (list, tuple)) else [images]:
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        if len(flat) != len(prompts):
            raise ValueError(f"the chat form takes one image per conversation; got {len(flat)} for {len(prompts)}.")
        special = self._special_ids()
        prompt = self._bos() + [special["image"]] * self.num_image_tokens + [special["cap"]]
        rows = []
        for text in prompts:
            start = self._chat_prompt(text)["caption_start"]
            rows.append(prompt + (self._tokenize_texts([start], "text")[0] if start.strip() else []))
        input_ids, attention_mask = self._batch(rows, special["pad"], left=True)
        pixel_values, _ = self._prepare_images(flat, None, **image_options)
        return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}

    # ------------------------------------------------------------------ images
    def _prepare_images(
        self,
        images: Any,
        boxes: Any | None,
        allow_references: bool = True,
        url_timeout: float | None = None,
        **image_options: Any,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """`pixel_values` of the images (the image processor run with `image_options`, e.g. `do_rescale`) and the
        boxes mapped to the model's frame through the same resize and crop."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("`images` must contain at least one image.")
        pil_images = [load_rgb_image(image, i, allow_references, url_timeout) for i, image in enumerate(images)]
        frame_boxes = None
        if boxes is not None:
            if not isinstance(boxes, (list, tuple)) or len(boxes) != len(pil_images):
                raise ValueError(
                    f"`boxes` must be a list with one list of [x0, y0, x1, y1] pixel boxes per image "
                    f"({len(pil_images)} images); got {type(boxes).__name__} of length "
                    f"{len(boxes) if hasattr(boxes, '__len__') else 'n/a'}."
                )
            frame = FrameSettings(self.image_processor, image_options)
            frame_boxes = [
                boxes_to_model_frame(frame, b, image.width, image.height, i)
                for i, (image, b) in enumerate(zip(pil_images, boxes))
            ]
            if sum(len(b) for b in frame_boxes) == 0:
                raise ValueError("`boxes` contains no box; pass `boxes=None` for whole images.")
        image_options = {k: v for k, v in image_options.items() if v is not None and k != "return_tensors"}
        pixel_values = None if image_options else pixels_of_images_in_frame(self.image_processor, pil_images)
        if pixel_values is None:
            pixel_values = self.image_processor(images=pil_images, return_tensors="pt", **image_options)["pixel_values"]
        return pixel_values, frame_boxes

    # ------------------------------------------------------------------ main entry
    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        boxes: Sequence[Any] | None = None,
        region_text: Sequence[Sequence[str]] | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Build model inputs; see the class docstring for what each combination of arguments gives.

        Args:
            images: one image or a list (PIL any mode, numpy, torch; HW, HWC or CHW; or image file paths / URLs).
            text: one string or a list: texts to embed, or with `images` the captions of the images.
            boxes: per image, a list of `[x0, y0, x1, y1]` boxes in original image pixels.
            region_text: with `images`, `text` and `boxes`, per image, the captions of its boxes.
            kwargs: transformers' processor options (`MMGEMProcessorKwargs`), flat or nested in `text_kwargs`,
                `images_kwargs` or `common_kwargs`; one given twice is an error. Text: `truncation` (cut texts that
                do not fit the context instead of raising), `max_length` (the longest sequence, for truncation and
                for `padding="max_length"`), `padding` (`"longest"`, the default, or `"max_length"`),
                `pad_to_multiple_of`. Images: the image processor's (`do_rescale`, `do_normalize`, `image_mean`,
                ...) and `allow_image_references`. `return_tensors`: `"pt"` (the default).

        Returns:
            A `BatchFeature` whose keys are `model_input_names` (those the call builds), plus `boxes` and
            `caption_rows` when `boxes` are given.
        """
        options = self._merge_kwargs(
            MMGEMProcessorKwargs, tokenizer_init_kwargs=getattr(self.tokenizer, "init_kwargs", {}), **kwargs
        )
        text_options, image_options = options["text_kwargs"], dict(options["images_kwargs"])
        return_tensors = text_options.get("return_tensors", image_options.get("return_tensors", "pt"))
        if return_tensors not in ("pt", None):
            raise ValueError(f"`return_tensors` must be 'pt'; got {return_tensors!r}.")
        truncation = text_options.get("truncation") not in (None, False, "do_not_truncate")
        max_length = text_options.get("max_length")
        pad_width = self._pad_width_rule(
            text_options.get("padding"), max_length, text_options.get("pad_to_multiple_of")
        )
        allow_references = bool(image_options.pop("allow_image_references", True))
        url_timeout = image_options.pop("image_url_timeout", None)
        if url_timeout is not None and not (isinstance(url_timeout, (int, float)) and url_timeout > 0):
            raise ValueError(f"`image_url_timeout` must be a positive number of seconds; got {url_timeout!r}.")
        image_options["url_timeout"] = url_timeout
        if images is None and text is None:
            raise ValueError("Give `images`, `text`, or both.")
        texts_list = [text] if isinstance(text, str) else text
        if images is not None and isinstance(texts_list, (list, tuple)) and texts_list:
            if all(self._chat_prompt(t) is not None for t in texts_list):  # rendered by `apply_chat_template`
                data = self.chat_prompt_inputs(images, text, **image_options)
                return BatchFeature(self._padded(data, pad_width, prompts=True))
        if images is None:
            if boxes is not None:
                raise ValueError("`boxes` need `images`.")
            return BatchFeature(self._padded(self.embedding_inputs(text, truncation, max_length), pad_width))
        # Texts are checked and tokenised first, so that bad text fails before any image work.
        text_data: dict[str, Any] = {}
        if text is not None:
            texts = self._training_texts(images, text, boxes, region_text)
            token_lists = self._tokenize_texts(texts, "text")  # once: both layouts hold the same texts
            embedding = self._embedding_rows(token_lists, truncation, max_length)
            text_data = {"text_input_ids": embedding["input_ids"], "text_attention_mask": embedding["attention_mask"]}
            text_data.update(self._caption_rows(token_lists, truncation, max_length))
        pixel_values, frame_boxes = self._prepare_images(images, boxes, allow_references, **image_options)
        data: dict[str, Any] = {"pixel_values": pixel_values}
        if frame_boxes is not None:
            data["boxes"] = frame_boxes
            # Tells `MMGEMModel.forward` which visual tokens the caption sequences take.
            data["caption_rows"] = "images_and_regions" if text_data else "regions"
        prompts = not text_data
        if prompts:
            num_rows = pixel_values.shape[0] if frame_boxes is None else sum(len(b) for b in frame_boxes)
            text_data = self.caption_prompt(num_rows)
        data.update(text_data)
        return BatchFeature(self._padded(data, pad_width, prompts=prompts))

    @staticmethod
    def _pad_width_rule(padding: Any, max_length: int | None, multiple: int | None) -> Any:
        """How wide the id tensors are padded, from the tokenizer options `padding` / `max_length` /
        `pad_to_multiple_of`: a function of the longest row's length."""
        if padding not in PAD_TO_LONGEST and padding != "max_length":
            raise ValueError(
                f"`padding` must be 'longest' (or True / False: a batch is always padded to one width) or "
                f"'max_length'; got {padding!r}."
            )
        if padding == "max_length" and max_length is None:
            raise ValueError("`padding='max_length'` needs `max_length`.")
        if multiple is not None and (not isinstance(multiple, int) or multiple < 1):
            raise ValueError(f"`pad_to_multiple_of` must be a positive int; got {multiple!r}.")

        def width(longest: int) -> int:
            target = max(longest, max_length) if padding == "max_length" else longest
            return target if multiple is None else -(-target // multiple) * multiple

        return width

    def _padded(self, data: dict[str, Any], pad_width: Any, prompts: bool = False) -> dict[str, Any]:
        """`data` with its id tensors padded to `pad_width(longest)` columns: caption prompts on the left (as
        generation needs), everything else on the right."""
        pad_id = self._special_ids()["pad"]
        fill = {
            "input_ids": pad_id,
            "attention_mask": 0,
            "labels": IGNORE_INDEX,
            "text_input_ids": pad_id,
            "text_attention_mask": 0,
        }
        groups = (("input_ids", "attention_mask", "labels"), ("text_input_ids", "text_attention_mask"))
        for keys in groups:
            present = [k for k in keys if k in data]
            if not present:
                continue
            width = pad_width(data[present[0]].shape[1])
            for key in present:
                tensor = data[key]
                extra = width - tensor.shape[1]
                if extra > 0:
                    side = (extra, 0) if prompts and key != "labels" else (0, extra)
                    data[key] = torch.nn.functional.pad(tensor, side, value=fill[key])
        return data

    @staticmethod
    def _training_texts(images: Any, text: Any, boxes: Any, region_text: Any) -> list[str]:
        """Image captions then region captions, checked against the image and box counts before any work."""
        num_images = len(images) if isinstance(images, (list, tuple)) else 1
        texts = _as_text_list(text, "text")
        if region_text is not None:
            if not isinstance(region_text, (list, tuple)) or not all(
                isinstance(per_image, (list, tuple)) for per_image in region_text
            ):
                raise TypeError(
                    "`region_text` must be a list with, per image, a list of region captions; got "
                    f"{type(region_text).__name__} {str(region_text)[:100]!r}."
                )
            for i, per_image in enumerate(region_text):
                _as_text_list(list(per_image), f"region_text[{i}]", allow_empty=True)
        if len(texts) != num_images:
            raise ValueError(f"`text` must hold one caption per image ({num_images}); got {len(texts)}.")
        if boxes is None:
            if region_text is not None:
                raise ValueError("`region_text` needs `boxes`.")
            return texts
        if (
            region_text is None
            or not isinstance(boxes, (list, tuple))
            or len(region_text) != len(boxes)
            or any(len(t) != len(b) for t, b in zip(region_text, boxes))
        ):
            raise ValueError("`region_text` must hold, per image, one caption per box of `boxes`.")
        return texts + [t for per_image in region_text for t in per_image]

    # ------------------------------------------------------------------ decoding
    def decode_captions(self, generated_ids: torch.Tensor) -> list[str]:
        """Text after the last `[CAP]` of each generated sequence, special tokens removed."""
        cap = self._special_ids()["cap"]
        captions = []
        for row in generated_ids.tolist():
            start = len(row) - row[::-1].index(cap) if cap in row else 0
            captions.append(self.tokenizer.decode(row[start:], skip_special_tokens=True).strip())
        return captions

    def post_process_image_text_to_text(self, generated_outputs: Any, skip_special_tokens: bool = True, **kwargs: Any):
        """Captions of `generate` outputs, as `decode_captions` (what the image-text-to-text pipeline returns)."""
        ids = torch.as_tensor(generated_outputs)
        return self.decode_captions(ids if ids.ndim == 2 else ids[None])

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        """What `__call__` returns for images with captions (a training batch); texts alone give the first two,
        images alone the first three. With `boxes`, `boxes` and `caption_rows` are added."""
        return ["input_ids", "attention_mask", "pixel_values", "text_input_ids", "text_attention_mask", "labels"]

    @property
    def image_token_id(self) -> int:
        """The id of the `<image>` placeholder token."""
        return self._special_ids()["image"]

    @classmethod
    def get_processor_dict(cls, *args: Any, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """As `ProcessorMixin.get_processor_dict`; folders saved before name the context `max_length`."""
        processor_dict, other = super().get_processor_dict(*args, **kwargs)
        if "max_length" in processor_dict and "context_length" not in processor_dict:
            processor_dict = dict(processor_dict)
            processor_dict["context_length"] = processor_dict.pop("max_length")
        return processor_dict, other

    def to_dict(self) -> dict[str, Any]:
        """As `ProcessorMixin.to_dict`, with the `auto_map` entry `save_pretrained` writes for this remote-code class
        always present, so that a processor built from its parts, a loaded one and a saved one compare equal."""
        output = super().to_dict()
        if type(self)._auto_class is not None:
            module = type(self).__module__.split(".")[-1]
            output["auto_map"] = {**(output.get("auto_map") or {}), self._auto_class: f"{module}.{type(self).__name__}"}
        return output


MMGEMProcessor.register_for_auto_class("AutoProcessor")
if __name__ == "modeling_mmgem.processing_mmgem":
    # Imported from the installed mmgem package (not as a Hub copy): register with AutoProcessor.
    from transformers import AutoProcessor

    from .configuration_mmgem import MMGEMConfig

    AutoProcessor.register(MMGEMConfig, MMGEMProcessor, exist_ok=True)

__all__ = ["MMGEMProcessor", "add_mmgem_special_tokens"]


# The steps of the PIL backend's image pipeline. An image processor whose class overrides none of them runs exactly
# the stock resize, center crop, rescale and normalize, which `pixels_of_images_in_frame` reproduces for images the
# resize and crop leave unchanged.
PIL_PIPELINE_STEPS = (
    "__call__",
    "preprocess",
    "_preprocess_image_like_inputs",
    "_prepare_image_like_inputs",
    "process_image",
    "convert_to_rgb",
    "_preprocess",
    "resize",
    "center_crop",
    "rescale",
    "normalize",
    "pad",
)


def _runs_stock_pil_pipeline(image_processor: Any) -> bool:
    if PilBackend is None or not isinstance(image_processor, PilBackend):
        return False
    owners = {step: next(c for c in type(image_processor).__mro__ if step in c.__dict__) for step in PIL_PIPELINE_STEPS}
    return all(owner.__module__.startswith("transformers.image_processing_") for owner in owners.values())


def pixels_of_images_in_frame(image_processor: Any, images: Sequence[Any]) -> torch.Tensor | None:
    """`pixel_values` [N, 3, H, W] of RGB PIL images that are already at the model's frame size (the resize and
    center crop leave them unchanged), computed for the whole batch at once; None where that does not hold, and the
    image processor must run. Equal bit for bit to the stock image processor on the PIL backend: each byte value's
    rescale (in float64, then float32) and normalize (in float32) is computed once and looked up for every pixel,
    instead of the per-image conversions that cost more than the arithmetic for images as small as a tower's input."""
    if not images or not _runs_stock_pil_pipeline(image_processor) or getattr(image_processor, "do_pad", None):
        return None
    size = images[0].size if isinstance(images[0], Image.Image) else None
    if size is None or any(not isinstance(i, Image.Image) or i.mode != "RGB" or i.size != size for i in images):
        return None
    if image_frame_transform(image_processor, *size) != (1.0, 1.0, 0.0, 0.0, *size):
        return None
    table = _pixel_value_table(image_processor)  # [3, 256]: the value of each byte in each channel
    pixels = np.stack([np.asarray(image) for image in images])  # [N, H, W, 3] uint8
    index = torch.from_numpy(pixels).permute(0, 3, 1, 2).long() + 256 * torch.arange(3).view(1, 3, 1, 1)
    return torch.from_numpy(table).flatten()[index].contiguous()  # [N, 3, H, W]: table[c, pixels[n, h, w, c]]


def _pixel_value_table(image_processor: Any) -> np.ndarray:
    """[3, 256]: what the stock rescale (float64, then float32) and normalize (float32) make of each byte value in each
    channel. Each pixel goes through the same arithmetic on its own, so looking its value up gives the same bits."""
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 256)).T  # [256, 3] channel last
    if image_processor.do_rescale:
        values = (values.astype(np.float64) * image_processor.rescale_factor).astype(np.float32)
    if image_processor.do_normalize:
        values = values if np.issubdtype(values.dtype, np.floating) else values.astype(np.float32)
        mean = np.array(_per_channel(image_processor.image_mean), dtype=values.dtype)
        std = np.array(_per_channel(image_processor.image_std), dtype=values.dtype)
        values = (values - mean) / std
    return np.ascontiguousarray(values.T)


def _per_channel(value: Any) -> list[float]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * 3
