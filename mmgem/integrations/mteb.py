"""MTEB / MIEB for MM-GEM: an mteb encoder that declares the image and text modalities.

    import mteb
    from mmgem.integrations.mteb import load_mteb_model

    model = load_mteb_model("path/to/mmgem-or-repo-id", trust_remote_code=True)
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["CIFAR10ZeroShot"]))  # any image, text or image-text task

Texts go through `get_text_features`, images through `get_image_features` (both L2-normalised; cosine similarity).
Samples that carry BOTH an image and a text (e.g. the documents of it2t / it2it retrieval, or interleaved queries)
are embedded as `normalize(normalize(image) + normalize(text))`: the mean direction of the two, so that an
image-text pair sits between its image and its caption in the shared space. `mteb.get_model(name)` builds its
wrapper from the Hub only; this loader works on local folders and repo ids alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from tqdm.auto import tqdm

from mmgem.embedding import encode_images, encode_texts

CITATION = """@article{ma2024mmgem,
  title={Multi-Modal Generative Embedding Model},
  author={Ma, Feipeng and Xue, Hongwei and Wang, Guangting and Zhou, Yizhou and Rao, Fengyun and Yan, Shilin and
          Zhang, Yueyi and Wu, Siying and Shou, Mike Zheng and Sun, Xiaoyan},
  journal={arXiv preprint arXiv:2405.19333},
  year={2024}
}"""


class MMGEMEncoder(AbsEncoder):
    """mteb's encoder protocol over an MM-GEM folder or repo id (see the module docstring for the rules)."""

    def __init__(
        self,
        model_name: str,
        revision: str | None = None,
        device: str | None = None,
        trust_remote_code: bool = False,
        dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> None:
        from transformers import AutoModel, AutoProcessor

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        load = {"revision": revision, "trust_remote_code": trust_remote_code}
        self.model = AutoModel.from_pretrained(model_name, dtype=dtype, **load).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model_name, **load)

    def _texts(self, texts: list[str]) -> torch.Tensor:
        return encode_texts(self.model, self.processor, list(texts), batch_size=max(len(texts), 1))  # [B, D]

    def _images(self, images: list[Any]) -> torch.Tensor:
        return encode_images(self.model, self.processor, list(images), batch_size=max(len(images), 1))  # [B, D]

    def encode(
        self,
        inputs: Any,
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        prompt_type: Any | None = None,
        show_progress_bar: bool = True,
        **kwargs: Any,
    ) -> np.ndarray:
        """Unit-length embeddings `[N, D]` of a DataLoader of batches with "text" and/or "image" columns."""
        rows = []
        for batch in tqdm(inputs, disable=not show_progress_bar, desc=f"MM-GEM {task_metadata.name}"):
            texts, images = batch.get("text"), batch.get("image")
            if texts is not None and images is not None:
                if len(texts) != len(images):
                    raise ValueError(f"a batch has {len(texts)} texts for {len(images)} images.")
                rows.append(F.normalize(self._images(images) + self._texts(texts), dim=-1))
            elif texts is not None:
                rows.append(self._texts(texts))
            elif images is not None:
                rows.append(self._images(images))
            else:
                raise ValueError(f"MM-GEM embeds texts and images; the batch has columns {sorted(batch)}.")
        return torch.cat(rows).cpu().numpy()


def mmgem_model_meta(model_name: str, revision: str | None = None, embed_dim: int | None = None) -> ModelMeta:
    """mteb's metadata for an MM-GEM: modalities image + text, cosine similarity, our loader."""
    # mteb wants names of the form "organization/model"; a folder in the working directory has no organization.
    name = model_name if "/" in model_name else f"local/{model_name}"
    return ModelMeta(
        loader=MMGEMEncoder,
        name=name,
        model_type=["dense"],
        languages=["eng-Latn"],
        revision=revision or "local",
        release_date=None,
        modalities=["image", "text"],
        n_parameters=None,
        n_embedding_parameters=None,
        memory_usage_mb=None,
        max_tokens=None,
        embed_dim=embed_dim,
        license=None,
        open_weights=True,
        public_training_code=None,
        public_training_data=None,
        framework=["PyTorch", "Transformers", "safetensors"],
        reference=None,
        similarity_fn_name=ScoringFunction.COSINE,
        use_instructions=False,
        training_datasets=None,
        citation=CITATION,
    )


def load_mteb_model(
    model_name: str, revision: str | None = None, device: str | None = None, trust_remote_code: bool = False, **kwargs
) -> MMGEMEncoder:
    """An MM-GEM (folder or repo id) as an mteb model, with its `mteb_model_meta`, for `mteb.evaluate`.

    `trust_remote_code=True` runs the folder's model code (MM-GEM folders carry it); without it the folder loads only
    where mmgem is installed.
    """
    # Built directly rather than through `ModelMeta.load_model`, which demands torchvision for every image model;
    # MM-GEM's image processors need PIL only.
    model = MMGEMEncoder(model_name, revision=revision, device=device, trust_remote_code=trust_remote_code, **kwargs)
    model.mteb_model_meta = mmgem_model_meta(model_name, revision, embed_dim=model.model.config.projection_dim)
    return model
