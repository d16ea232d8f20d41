"""A SigLIP-tower folder in the pooling engine: vLLM's SiglipVisionTransformer (no attention-pooling head) gives the
image embeddings of the transformers model, and texts still match."""

from __future__ import annotations

import pytest
import torch

from mmgem.embedding import encode_images, encode_texts
from mmgem.serving.vllm import text_prompt
from modeling_mmgem.modeling_mmgem import MMGEMModel
from modeling_mmgem.processing_mmgem import MMGEMProcessor
from tests_serve.conftest import start_llm, stop_llm
from tests_serve.helpers import serve_test_folder
from tests_serve.test_llm_embeddings import ATOL, TEXTS, image_request, vectors

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    folder = serve_test_folder(tmp_path_factory.mktemp("siglip") / "tiny-mmgem-siglip", vision="siglip")
    engine = start_llm(folder, "pooling")
    yield engine, MMGEMModel.from_pretrained(folder).eval(), MMGEMProcessor.from_pretrained(folder)
    stop_llm(engine)


def test_siglip_image_and_text_embeddings_match_transformers(siglip, images):
    llm, model, processor = siglip
    assert model.config.vision_config.model_type == "siglip_vision_model"
    torch.testing.assert_close(
        vectors(llm.embed([image_request(image) for image in images])),
        encode_images(model, processor, images),
        atol=ATOL,
        rtol=0,
    )
    got = vectors(llm.embed([text_prompt(t, processor.tokenizer) for t in TEXTS]))
    torch.testing.assert_close(got, encode_texts(model, processor, TEXTS), atol=ATOL, rtol=0)
