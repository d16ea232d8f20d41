"""The transformers model API on MMGEMModel: tuple outputs, the output switches of the feature methods,
`shift_labels`, `inputs_embeds` with images, and the initialisation of weights a folder lacks."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_mmgem import MMGEMModel

from .conftest import random_images

pytestmark = pytest.mark.fast
IMAGES = random_images(2, seed=3)


def _caption_batch(tiny):
    model, processor = tiny
    return processor(images=IMAGES, text=["a red circle", "a small blue square on the left"])


def test_return_dict_false_gives_tuples(tiny):
    model, processor = tiny
    batch = _caption_batch(tiny)
    with torch.no_grad():
        as_dict = model(**batch)
        as_tuple = model(**batch, return_dict=False)
        text = model.get_text_features(batch["text_input_ids"], batch["text_attention_mask"], return_dict=False)
        image = model.get_image_features(batch["pixel_values"], return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(text, tuple) and isinstance(image, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)  # loss first, as transformers' models order it
    with torch.no_grad():
        expected_text = model.get_text_features(batch["text_input_ids"], batch["text_attention_mask"]).pooler_output
    torch.testing.assert_close(text[1], expected_text)
    with torch.no_grad():
        expected_image = model.get_image_features(batch["pixel_values"]).pooler_output
    torch.testing.assert_close(image[1], expected_image)


def test_feature_methods_return_hidden_states_and_attentions(tiny):
    model, processor = tiny
    batch = _caption_batch(tiny)
    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")  # SDPA gives no attention weights
    layers = model.config.text_config.num_hidden_layers
    with torch.no_grad():
        text = model.get_text_features(
            batch["text_input_ids"], batch["text_attention_mask"], output_hidden_states=True, output_attentions=True
        )
        image = model.get_image_features(batch["pixel_values"], output_hidden_states=True, output_attentions=True)
    assert len(text.hidden_states) == layers + 1 and len(text.attentions) == layers
    assert len(image.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    assert len(image.attentions) == model.config.vision_config.num_hidden_layers
    # The hidden states line up with the caller's tokens (same width as `input_ids`, whatever the padding side).
    assert text.last_hidden_state.shape[:2] == batch["text_input_ids"].shape
    assert text.hidden_states[-1].shape[:2] == batch["text_input_ids"].shape


def test_shift_labels_alone_give_the_loss_of_labels(tiny):
    model, processor = tiny
    batch = processor(images=IMAGES, text=["a red circle", "a small blue square on the left"])
    captions = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    labels = batch["labels"]
    shift_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    with torch.no_grad():
        expected = model(**captions, labels=labels).loss
        got = model(**captions, shift_labels=shift_labels).loss
    assert got is not None
    torch.testing.assert_close(got, expected)


def test_inputs_embeds_with_images_use_the_placeholder_rows(tiny):
    model, processor = tiny
    prompt = processor(images=IMAGES)
    embeds = model.get_input_embeddings()(prompt["input_ids"])
    with torch.no_grad():
        from_ids = model(**prompt).logits
        from_embeds = model(
            inputs_embeds=embeds, attention_mask=prompt["attention_mask"], pixel_values=prompt["pixel_values"]
        ).logits
        other_images = model(
            inputs_embeds=embeds,
            attention_mask=prompt["attention_mask"],
            pixel_values=prompt["pixel_values"].flip(0),
        ).logits
    torch.testing.assert_close(from_embeds, from_ids)
    assert not torch.allclose(from_embeds, other_images)  # the images are used, not dropped

    no_placeholder = embeds.clone()
    no_placeholder[prompt["input_ids"] == model.config.image_token_id] = 0.0
    with pytest_raises("inputs_embeds"):
        model(inputs_embeds=no_placeholder, pixel_values=prompt["pixel_values"])
    with pytest_raises("inputs_embeds"):
        model.generate(inputs_embeds=no_placeholder, pixel_values=prompt["pixel_values"], max_new_tokens=3)


def test_generate_from_inputs_embeds_captions_the_images(tiny):
    model, processor = tiny
    prompt = processor(images=IMAGES)
    embeds = model.get_input_embeddings()(prompt["input_ids"])
    prompt_length = prompt["input_ids"].shape[1]
    with torch.no_grad():
        from_ids = model.generate(**prompt, max_new_tokens=6, do_sample=False)[:, prompt_length:]
        from_embeds = model.generate(
            inputs_embeds=embeds,
            attention_mask=prompt["attention_mask"],
            pixel_values=prompt["pixel_values"],
            max_new_tokens=6,
            do_sample=False,
        )
    torch.testing.assert_close(from_embeds, from_ids)


def test_folder_without_tower_weights_initialises_the_tower_by_its_own_scheme(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("vision_model.")}, tmp_path / "model.safetensors")
    torch.manual_seed(0)
    loaded = MMGEMModel.from_pretrained(tmp_path)
    vision = model.config.vision_config
    # CLIP's own scheme for q_proj: std = hidden^-0.5 * (2 * layers)^-0.5 * initializer_factor.
    expected = vision.hidden_size**-0.5 * (2 * vision.num_hidden_layers) ** -0.5 * vision.initializer_factor
    q_proj = dict(loaded.vision_model.named_parameters())["encoder.layers.0.self_attn.q_proj.weight"]
    assert abs(q_proj.std().item() - expected) < 0.25 * expected, (q_proj.std().item(), expected)
    # The weights the folder holds are loaded, not re-initialised.
    for name, tensor in loaded.language_model.state_dict().items():
        torch.testing.assert_close(tensor, model.language_model.state_dict()[name])


def pytest_raises(word: str):
    return pytest.raises(ValueError, match=word)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_in_a_joint_step_recomputes_and_keeps_the_gradients(use_reentrant):
    """What transformers' gradient-checkpointing checks assert, on a joint stage-2 step (the LM runs twice: texts and
    captions): checkpointed layers run again in backward, and every gradient equals the plain step's."""
    from PIL import Image

    from mmgem.build import tiny_mmgem
    from mmgem.data.collator import MMGEMCollator
    from modeling_mmgem.utils_mmgem import enable_activation_checkpointing

    torch.manual_seed(0)
    model, processor = tiny_mmgem()
    model.train()
    image = Image.new("RGB", (32, 32), "white")
    regions = [{"box": [0, 0, 16, 16], "caption": "a red circle"}]
    items = [{"image": image, "caption": "a small blue square", "regions": regions}] * 2
    batch = MMGEMCollator(processor, stage=2, seed=0, unique_region_texts=False)(items)
    calls = []  # runs of a module inside the first LM layer (the layer itself is re-entered by the checkpoint)
    model.language_model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        calls.clear()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_calls = gradients(), len(calls)
    enable_activation_checkpointing(model, {"use_reentrant": use_reentrant})  # the name depends on the release
    checkpointed, checkpointed_calls = gradients(), len(calls)
    assert plain_calls == 2 and checkpointed_calls == 4  # texts and captions, each run again in backward
    assert checkpointed.keys() == plain.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)
