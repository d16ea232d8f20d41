"""`vllm serve FOLDER --runner generate`: /v1/chat/completions with an image gives the caption of `generate`."""

from __future__ import annotations

import pytest

from mmgem.embedding import caption
from tests_serve.helpers import Server, image_data_url

MAX_TOKENS = 12

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def server(folder):
    running = Server(folder, "generate")
    yield running
    running.stop()


def test_caption_over_chat_completions(server, reference, images):
    from openai import OpenAI

    model, processor = reference
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    for image in images[:2]:
        message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url(image)}}]}
        response = client.chat.completions.create(
            model=str(server.folder), messages=[message], temperature=0.0, max_tokens=MAX_TOKENS
        )
        expected = caption(model, processor, [image], max_new_tokens=MAX_TOKENS)[0]
        # A caption cut by max_tokens can end inside a multi-byte character: the server's detokenizer holds those
        # bytes back where `decode` shows U+FFFD (the token ids themselves are compared through LLM(...)).
        assert response.choices[0].message.content.strip() == expected.rstrip("\ufffd").strip()
        assert expected  # a random model still writes some words
