"""`vllm serve FOLDER --runner pooling`: /v1/embeddings for texts (openai client) and for an image (chat-style
messages, plain HTTP), against the transformers model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmgem.embedding import encode_images, encode_texts
from mmgem.serving.vllm import text_prompt
from tests_serve.helpers import Server, image_data_url

ATOL = 1e-4

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def server(folder):
    running = Server(folder, "pooling")
    yield running
    running.stop()


def test_text_embeddings_over_http(server, reference):
    from openai import OpenAI

    model, processor = reference
    texts = ["red", "a small red circle on the left", "a large blue square on the top " * 6]
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    response = client.embeddings.create(
        model=str(server.folder), input=[text_prompt(t, processor.tokenizer) for t in texts], encoding_format="float"
    )
    got = F.normalize(torch.tensor([row.embedding for row in response.data]), dim=-1)
    torch.testing.assert_close(got, encode_texts(model, processor, texts), atol=ATOL, rtol=0)


def test_image_embedding_over_http(server, reference, images):
    model, processor = reference
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url(images[0])}}]}
    response = server.post(
        "/v1/embeddings", {"model": str(server.folder), "messages": [message], "encoding_format": "float"}
    )
    got = F.normalize(torch.tensor([response["data"][0]["embedding"]]), dim=-1)
    torch.testing.assert_close(got, encode_images(model, processor, images[:1]), atol=ATOL, rtol=0)
