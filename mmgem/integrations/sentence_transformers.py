"""sentence-transformers integration: every saved MM-GEM folder is also a SentenceTransformer model.

sentence-transformers 6 loads multimodal transformers models natively: its built-in `Transformer` module calls one
model method per modality (`modality_config`) and a `Normalize` module follows. MM-GEM needs no custom module:

    text  -> MMGEMModel.get_text_features(input_ids, attention_mask).pooler_output
    image -> MMGEMModel.get_image_features(pixel_values).pooler_output
    then  -> L2 normalisation

so `SentenceTransformer(folder_or_repo, trust_remote_code=True)` encodes strings and images (PIL images or arrays;
strings are never opened as files or fetched as URLs, even those that end in `.png`: see `PROCESSING_KWARGS`) into
one normalised space, and `similarity`,
`encode_query` / `encode_document`, `batch_size`, `show_progress_bar`, `convert_to_tensor`, `truncate_dim`, the
evaluators, `save` and `push_to_hub` all work as for any other model. The files are small JSON files written next
to the transformers files ([`write_sentence_transformers_files`]), so one folder or Hub repo serves both libraries.

Region queries (an image plus a box) do not fit sentence-transformers' input forms: a sample is a string, an image,
or a dict keyed by modality ("text", "image", "audio", "video"), with no room for a box, and `encode` reorders inputs
by length, so per-call processor kwargs cannot carry boxes either. [`encode_regions`] gives region embeddings in the
same space from a loaded SentenceTransformer (or an `MMGEMModel` and its processor).

This module is not remote code: it runs where mmgem is installed (e.g. by the conversion script); loading the
resulting folder needs only sentence-transformers and `trust_remote_code=True`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

import modeling_mmgem  # noqa: F401  (registers the installed classes with the Auto classes)
from mmgem.embedding import encode_regions as embed_regions
from mmgem.files import write_json_atomic
from mmgem.loading import check_model_folder

# The modality config of sentence-transformers' `Transformer` module for MM-GEM: which model method embeds each
# modality, and which field of its output holds the embedding. `module_output_name="sentence_embedding"` means no
# Pooling module is needed: the method already returns one vector per input.
MODALITY_CONFIG: dict[str, dict[str, str]] = {
    "text": {"method": "get_text_features", "method_output_name": "pooler_output"},
    "image": {"method": "get_image_features", "method_output_name": "pooler_output"},
}
# Processor options sentence-transformers passes at every call: images must come as images, never as strings.
PROCESSING_KWARGS: dict[str, dict[str, Any]] = {"image": {"allow_image_references": False}}
SIMILARITY_FUNCTIONS = ("cosine", "dot", "euclidean", "manhattan")
NORMALIZE_FOLDER = "1_Normalize"
# Written last: sentence-transformers recognises a folder as its own by `modules.json`, so an interrupted write never
# leaves a folder that looks complete.
SENTENCE_TRANSFORMERS_FILES = (
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    f"{NORMALIZE_FOLDER}/config.json",
    "modules.json",
)


# ---------------------------------------------------------------------------------------------- files
def sentence_transformers_configs(
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    similarity_fn_name: str = "cosine",
) -> dict[str, Any]:
    """The contents of the sentence-transformers files of an MM-GEM folder, keyed by relative path.

    The same files `SentenceTransformer.save` writes for a `Transformer(modality_config=MODALITY_CONFIG)` followed by
    `Normalize()`.
    """
    prompts = {"query": "", "document": ""} if prompts is None else dict(prompts)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise ValueError(f"`prompts` must map prompt names to prompt strings; got {prompts!r}.")
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise ValueError(f"`default_prompt_name` {default_prompt_name!r} is not one of the `prompts` {list(prompts)}.")
    if similarity_fn_name not in SIMILARITY_FUNCTIONS:
        raise ValueError(f"`similarity_fn_name` must be one of {SIMILARITY_FUNCTIONS}; got {similarity_fn_name!r}.")
    return {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": NORMALIZE_FOLDER,
                "type": "sentence_transformers.base.modules.normalize.Normalize",
            },
        ],
        "sentence_bert_config.json": {
            "transformer_task": "feature-extraction",
            "modality_config": MODALITY_CONFIG,
            "module_output_name": "sentence_embedding",
            # sentence-transformers reads any text ending in an image extension (or an http URL of one) as an image
            # reference; the processor then refuses such strings instead of opening files or fetching URLs.
            "processing_kwargs": PROCESSING_KWARGS,
        },
        f"{NORMALIZE_FOLDER}/config.json": {
            "module_input_name": "sentence_embedding",
            "module_output_name": "sentence_embedding",
        },
        "config_sentence_transformers.json": {
            "__version__": _library_versions(),
            "default_prompt_name": default_prompt_name,
            "model_type": "SentenceTransformer",
            "prompts": prompts,
            "similarity_fn_name": similarity_fn_name,
        },
    }


def _library_versions() -> dict[str, str]:
    """Versions recorded in `config_sentence_transformers.json`, as `SentenceTransformer.save` records them."""

    return {
        "pytorch": torch.__version__,
        "sentence_transformers": version("sentence-transformers"),
        "transformers": version("transformers"),
    }


def _check_mmgem_folder(model_dir: Path) -> None:
    config_file = model_dir / "config.json"
    if not model_dir.is_dir() or not config_file.is_file():
        raise ValueError(
            f"`model_dir` must be a folder written by `MMGEMModel.save_pretrained` (with config.json); got {model_dir}."
        )
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as error:
        raise ValueError(f"`model_dir` has an unreadable config.json: {config_file} ({error}).") from error
    if model_type != "mmgem":
        raise ValueError(
            f"`model_dir` must hold an MM-GEM model (model_type 'mmgem'); {config_file} says {model_type!r}."
        )


def write_sentence_transformers_files(
    model_dir: str | Path,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    similarity_fn_name: str = "cosine",
) -> None:
    """Make a saved MM-GEM folder loadable as `SentenceTransformer(model_dir, trust_remote_code=True)` too.

    Writes, next to the transformers files (which stay untouched):

    - `sentence_bert_config.json`: the built-in `Transformer` module with `MODALITY_CONFIG` (texts through
      `get_text_features`, images through `get_image_features`, both `.pooler_output`).
    - `config_sentence_transformers.json`: model type, `prompts` (default: empty "query" and "document" prompts, as
      MM-GEM is trained without instructions), `default_prompt_name`, `similarity_fn_name` (default cosine) and the
      library versions.
    - `1_Normalize/config.json`: the `Normalize` module (unit-length embeddings).
    - `modules.json` (last): the module list.

    Each file is written atomically; calling it again overwrites them (idempotent). No README is written.

    Args:
        model_dir: a folder written by `MMGEMModel.save_pretrained` (and `MMGEMProcessor.save_pretrained`).
        prompts: prompt name -> text prepended to texts by `encode(prompt_name=...)` / `encode_query`.
        default_prompt_name: prompt applied when none is given, or None.
        similarity_fn_name: one of "cosine", "dot", "euclidean", "manhattan" (embeddings are normalised, so cosine
            and dot give the same ranking).

    Raises:
        ValueError: `model_dir` is not an MM-GEM folder, or an argument is invalid (checked before writing).
    """
    model_dir = Path(model_dir)
    _check_mmgem_folder(model_dir)
    configs = sentence_transformers_configs(prompts, default_prompt_name, similarity_fn_name)
    for relative_path in SENTENCE_TRANSFORMERS_FILES:
        write_json_atomic(model_dir / relative_path, configs[relative_path])


def load_sentence_transformer(model_name_or_path: str | Path, **kwargs: Any) -> Any:
    """`SentenceTransformer(model_name_or_path, **kwargs)`: a saved MM-GEM folder or Hub repo, with this project's
    installed classes.

    No code from the folder or repo runs unless `trust_remote_code=True` is passed (the installed classes need none:
    importing them registers MM-GEM with transformers' Auto classes). A folder saved by `save_pretrained` without
    the sentence-transformers files gets them first (locally only).
    """
    from sentence_transformers import SentenceTransformer

    path = Path(model_name_or_path)
    if path.is_dir():
        check_model_folder(path, "model_name_or_path", bool(kwargs.get("trust_remote_code")))
        if not (path / "modules.json").exists():
            write_sentence_transformers_files(path)
    return SentenceTransformer(str(model_name_or_path), **kwargs)


# ---------------------------------------------------------------------------------------------- regions
def _model_and_processor(model: Any, processor: Any | None) -> tuple[Any, Any, int | None]:
    """(MMGEMModel, processor, default truncate_dim) from a SentenceTransformer or an MMGEMModel + processor."""
    if hasattr(model, "get_image_features"):
        if processor is None:
            raise ValueError("`processor` is required when `model` is an MMGEMModel (not a SentenceTransformer).")
        return model, processor, None
    first = model[0] if hasattr(model, "__getitem__") else None
    inner = getattr(first, "model", None)
    if inner is None or not hasattr(inner, "get_image_features"):
        raise ValueError(
            "`model` must be a SentenceTransformer loaded from an MM-GEM folder or an MMGEMModel; "
            f"got {type(model).__name__}."
        )
    return inner, processor if processor is not None else first.processor, getattr(model, "truncate_dim", None)


def encode_regions(
    model: Any,
    images: Sequence[Any],
    boxes: Sequence[Sequence[Sequence[float]]],
    processor: Any | None = None,
    batch_size: int = 32,
    show_progress_bar: bool | None = None,
    convert_to_tensor: bool = False,
    normalize_embeddings: bool = True,
    truncate_dim: int | None = None,
) -> np.ndarray | torch.Tensor:
    """Region embeddings in the space of the text and image embeddings (what sentence-transformers cannot take).

    Args:
        model: a SentenceTransformer loaded from an MM-GEM folder, or an `MMGEMModel` (then pass `processor`).
        images: PIL images (any mode), numpy arrays, tensors, or image file paths.
        boxes: per image, a list of `[x0, y0, x1, y1]` boxes in pixels of that original image.
        processor: the `MMGEMProcessor` (taken from the SentenceTransformer when omitted).
        batch_size: images per forward pass (all boxes of an image go with it).
        show_progress_bar: show a tqdm bar over batches (default: only for more than one batch).
        convert_to_tensor: return a torch tensor instead of a numpy array.
        normalize_embeddings: L2-normalise (as the SentenceTransformer's `Normalize` module does).
        truncate_dim: keep the first dimensions only (default: the SentenceTransformer's `truncate_dim`).

    Returns:
        `[sum of len(boxes[i]), D]`: the regions of image 0 first, each image's in the order given.
    """
    mmgem, processor, default_truncate_dim = _model_and_processor(model, processor)
    truncate_dim = truncate_dim if truncate_dim is not None else default_truncate_dim
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError("`images` must be a non-empty list of images or image paths.")
    if not isinstance(boxes, Sequence) or len(boxes) != len(images):
        raise ValueError(f"`boxes` must hold one list of [x0, y0, x1, y1] pixel boxes per image ({len(images)}).")
    if any(len(image_boxes) == 0 for image_boxes in boxes):
        raise ValueError("`boxes` must hold at least one box for every image.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer; got {batch_size!r}.")
    if truncate_dim is not None and (not isinstance(truncate_dim, int) or truncate_dim < 1):
        raise ValueError(f"`truncate_dim` must be a positive integer or None; got {truncate_dim!r}.")
    show = len(images) > batch_size if show_progress_bar is None else show_progress_bar
    mmgem.eval()  # as SentenceTransformer.encode does: no dropout in embeddings
    embeddings = embed_regions(
        mmgem,
        processor,
        list(images),
        list(boxes),
        batch_size=batch_size,
        normalize=normalize_embeddings,
        progress=show,
    )
    if truncate_dim is not None:
        embeddings = embeddings[:, :truncate_dim]
    return embeddings if convert_to_tensor else embeddings.numpy()


__all__ = [
    "MODALITY_CONFIG",
    "encode_regions",
    "load_sentence_transformer",
    "sentence_transformers_configs",
    "write_sentence_transformers_files",
]
