"""transformers pipelines on an exported folder, where mmgem is not installed: the four tasks the folder's
`config.custom_pipelines` serves give exactly what the model's own methods give."""

from __future__ import annotations

import json

import pytest

from .outside import run_outside, saved_tiny_folder

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return saved_tiny_folder(tmp_path_factory.mktemp("pipelines") / "tiny-mmgem")


def test_folder_registers_the_four_pipelines(folder):
    config = json.loads((folder / "config.json").read_text())
    assert set(config["custom_pipelines"]) == {
        "zero-shot-image-classification",
        "image-text-to-text",
        "image-to-text",
        "image-feature-extraction",
        "feature-extraction",
    }
    assert (folder / "pipeline_mmgem.py").is_file()


def test_pipelines_equal_the_model_methods_without_the_project(folder):
    run_outside(
        f"""
        import numpy as np, torch, torch.nn.functional as F
        from PIL import Image
        from transformers import AutoModel, AutoProcessor, pipeline
        folder = {str(folder)!r}
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        rng = np.random.RandomState(0)
        images = [Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in ((50, 40), (32, 32))]
        labels = ["red circle", "blue square", "green star", "small yellow triangle"]

        def cosine_ranking(image, template):
            with torch.no_grad():
                image_embeds = model.get_image_features(processor(images=[image])["pixel_values"]).pooler_output
                texts = processor(text=[template.format(label) for label in labels])
                text_embeds = model.get_text_features(**texts).pooler_output
            cosine = (F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T)[0]
            scores = (model.logit_scale() * cosine).softmax(-1)
            order = cosine.argsort(descending=True).tolist()
            return [labels[i] for i in order], [scores[i].item() for i in order]

        # zero-shot-image-classification: one image, a list, and a custom hypothesis_template
        classify = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
        for template in ("This is a photo of {{}}.", "a drawing of a {{}}"):
            kwargs = {{}} if template.startswith("This is") else {{"hypothesis_template": template}}
            results = classify(images, candidate_labels=labels, **kwargs)
            assert len(results) == 2
            for image, result in zip(images, results):
                ranked, scores = cosine_ranking(image, template)
                assert [r["label"] for r in result] == ranked, (result, ranked)
                np.testing.assert_allclose([r["score"] for r in result], scores, atol=1e-6)
            single = classify(images[0], candidate_labels=labels, **kwargs)
            assert [r["label"] for r in single] == [r["label"] for r in results[0]]
        default = classify(images[0], candidate_labels=labels)
        custom = classify(images[0], candidate_labels=labels, hypothesis_template="a drawing of a {{}}")
        assert [r["score"] for r in default] != [r["score"] for r in custom], "hypothesis_template was ignored"

        # image-text-to-text: no prompt, generation options, the chat form
        caption = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
        for options in ({{"max_new_tokens": 6}}, {{"max_new_tokens": 4, "num_beams": 2}}):
            with torch.no_grad():
                expected = processor.decode_captions(model.generate(**processor(images=images[0]), **options))[0]
            got = caption(images=images[0], **options)
            assert got[0]["generated_text"] == expected, (got, expected)
            chat = [{{"role": "user", "content": [{{"type": "image", "image": images[0]}}]}}]
            answer = caption(text=chat, return_full_text=False, **options)
            assert answer[0]["generated_text"] == expected, (answer, expected)
            full = caption(text=chat, **options)
            assert full[0]["generated_text"][-1] == {{"role": "assistant", "content": expected}}
        short = caption(images=images[0], max_new_tokens=1)[0]["generated_text"]
        long = caption(images=images[0], max_new_tokens=8)[0]["generated_text"]
        # max_new_tokens reaches generate (a decoded token may be part of a character, so count characters)
        assert 0 < len(short) < len(long), (short, long)
        alias = pipeline("image-to-text", model=folder, trust_remote_code=True)
        assert alias(images=images[0], max_new_tokens=6) == caption(images=images[0], max_new_tokens=6)
        both = caption(images=images, max_new_tokens=3)
        assert len(both) == 2 and all(len(r) == 1 for r in both)
        try:
            caption(text=[{{"role": "user", "content": [{{"type": "image", "image": images[0]}},
                                                      {{"type": "text", "text": "Describe it."}}]}}])
            raise AssertionError("an instruction was silently ignored")
        except Exception as error:
            assert "instruction" in str(error), error

        # image-feature-extraction and feature-extraction: the embeddings, never logits or hidden states
        image_features = pipeline("image-feature-extraction", model=folder, trust_remote_code=True)
        text_features = pipeline("feature-extraction", model=folder, trust_remote_code=True)
        with torch.no_grad():
            expected_image = model.get_image_features(processor(images=[images[1]])["pixel_values"]).pooler_output
            expected_text = model.get_text_features(**processor(text=["a red circle"])).pooler_output
        got_image = torch.tensor(image_features(images[1]))
        got_text = torch.tensor(text_features("a red circle"))
        assert got_image.shape == got_text.shape == (1, model.config.projection_dim)
        torch.testing.assert_close(got_image, expected_image)
        torch.testing.assert_close(got_text, expected_text)
        print("OK")
        """,
        cwd=folder.parent,
    )
