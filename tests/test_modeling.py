"""The core model: equivalence with stock transformers modules, invariances, generation, gradients, round trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionModel,
    SiglipVisionModel,
)

from mmgem.build import tiny_mmgem
from modeling_mmgem import MMGEMConfig, MMGEMModel

from .conftest import random_images
from .outside import run_outside

pytestmark = pytest.mark.fast
REPO_ROOT = Path(__file__).resolve().parents[1]


def _copy_of(module: torch.nn.Module, stock_cls, config) -> torch.nn.Module:
    stock = stock_cls(config).eval()
    missing, unexpected = stock.load_state_dict(module.state_dict(), strict=True), None
    assert unexpected is None and not missing.missing_keys
    return stock


# ------------------------------------------------------------------------------------------ stock equivalence
@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_vision_tower_equals_stock_model(vision):
    torch.manual_seed(0)
    model, processor = tiny_mmgem(vision=vision)
    model.eval()
    stock_cls = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}[vision]
    stock = _copy_of(model.vision_model, stock_cls, model.config.vision_config)
    pixel_values = processor(images=random_images(3))["pixel_values"]
    with torch.no_grad():
        ours = model.vision_model(pixel_values=pixel_values).last_hidden_state
        theirs = stock(pixel_values=pixel_values).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("text", ["llama", "qwen2"])
def test_text_only_logits_equal_stock_causal_lm(text):
    torch.manual_seed(0)
    model, processor = tiny_mmgem(text=text)
    model.eval()
    stock = AutoModelForCausalLM.from_config(model.config.text_config).eval()
    stock.load_state_dict(model.language_model.state_dict())
    batch = processor.tokenizer(["a red circle on the left", "a star"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        theirs = stock(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0),
        ).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[mask], theirs[mask])


# ------------------------------------------------------------------------------------------ invariances
def test_text_features_invariant_to_padding_batch_and_emb(tiny):
    model, processor = tiny
    texts = ["a small red circle", "a large blue star on the right side of the picture", "green"]
    inputs = processor(text=texts)
    with torch.no_grad():
        batched = model.get_text_features(**inputs).pooler_output
        alone = torch.cat([model.get_text_features(**processor(text=[t])).pooler_output for t in texts])
        # Left padding, and `[EMB]` left out by the caller (the model appends it).
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        lengths = mask.sum(1)
        emb_id = model.config.emb_token_id
        rows = [ids[i, : lengths[i] - 1].tolist() for i in range(len(texts))]  # drop [EMB]
        width = max(map(len, rows))
        pad = processor.tokenizer.pad_token_id
        left_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        left_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        left = model.get_text_features(input_ids=left_ids, attention_mask=left_mask).pooler_output
    assert (ids == emb_id).sum() == len(texts)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(left, batched, atol=1e-5, rtol=1e-4)


def test_image_features_invariant_to_batch(tiny, images):
    model, processor = tiny
    with torch.no_grad():
        batched = model.get_image_features(**_pixels(processor, images)).pooler_output
        alone = torch.cat([model.get_image_features(**_pixels(processor, [im])).pooler_output for im in images])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


def _pixels(processor, images):
    return {"pixel_values": processor(images=images)["pixel_values"]}


def test_whole_image_box_gives_image_features(tiny, images):
    """With a patch grid divisible by the pool grid, RoIAlign of the full box samples exactly the patch centres."""
    model, processor = tiny
    pixel_values = processor(images=images)["pixel_values"]
    full = [torch.tensor([[0.0, 0.0, 1.0, 1.0]]) for _ in images]
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixel_values).pooler_output
        region = model.get_image_features(pixel_values=pixel_values, boxes=full)
        tokens_image = model.get_visual_tokens(pixel_values)
        tokens_region = model.get_visual_tokens(pixel_values, boxes=full)
    torch.testing.assert_close(region.pooler_output, image, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tokens_region, tokens_image, atol=1e-5, rtol=1e-4)
    assert region.region_image_index.tolist() == list(range(len(images)))


def test_region_features_follow_the_box_content(tiny):
    """A box around a region of one image equals that crop's features only if the box is used (not the full map)."""
    model, processor = tiny
    pixel_values = processor(images=random_images(1))["pixel_values"]
    boxes = [torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])]
    with torch.no_grad():
        regions = model.get_image_features(pixel_values=pixel_values, boxes=boxes).pooler_output
    assert regions.shape == (2, model.config.projection_dim)
    assert not torch.allclose(regions[0], regions[1])


def test_processor_maps_pixel_boxes_through_resize_and_crop(tiny):
    _, processor = tiny
    # 64x32 image -> shortest edge 32 -> 64x32 -> center crop 32x32 keeps x in [16, 48).
    image = random_images(1, sizes=((64, 32),))[0]
    out = processor(images=[image], boxes=[[[16, 0, 48, 32], [0, 0, 32, 16]]])
    torch.testing.assert_close(out["boxes"][0][0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(out["boxes"][0][1], torch.tensor([0.0, 0.0, 0.5, 0.5]))  # clipped by the crop
    assert out["input_ids"].shape[0] == 2  # one caption prompt per region


# ------------------------------------------------------------------------------------------ generation
def test_generate_with_cache_equals_without_and_batched_equals_single(tiny, images):
    model, processor = tiny
    inputs = processor(images=images)
    kwargs = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        cached = model.generate(**inputs, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, **kwargs)
        single = [model.generate(**processor(images=[im]), **kwargs) for im in images]
    assert torch.equal(cached, uncached)
    for row, one in zip(cached, single):
        assert torch.equal(row[: one.shape[1]], one[0])
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(cached[:, :prompt_length], inputs["input_ids"])


def test_generate_without_prompt_beam_search_sampling_and_regions(tiny, images):
    model, processor = tiny
    pixel_values = processor(images=images[:2])["pixel_values"]
    with torch.no_grad():
        greedy = model.generate(pixel_values=pixel_values, max_new_tokens=4)
        beams = model.generate(pixel_values=pixel_values, max_new_tokens=4, num_beams=3, num_return_sequences=2)
        torch.manual_seed(0)
        sampled = model.generate(pixel_values=pixel_values, max_new_tokens=4, do_sample=True, top_k=5)
        regions = processor(images=images[:2], boxes=[[[0, 0, 20, 20], [5, 5, 30, 30]], [[1, 1, 10, 10]]])
        region_ids = model.generate(**regions, max_new_tokens=4, num_beams=2)
        single_region = model.generate(
            pixel_values=regions["pixel_values"][1:], boxes=[regions["boxes"][1]], max_new_tokens=4, num_beams=2
        )
    assert greedy.shape[0] == 2 and beams.shape[0] == 4 and sampled.shape[0] == 2
    assert region_ids.shape[0] == 3
    assert torch.equal(region_ids[2, : single_region.shape[1]], single_region[0])
    assert all(isinstance(c, str) for c in processor.decode_captions(region_ids))


# ------------------------------------------------------------------------------------------ training
def _training_batch(processor, count=4, with_regions=False):
    images = random_images(count)
    captions = [f"a {c} circle" for c in ("red", "blue", "green", "yellow", "purple", "orange", "red", "blue")][:count]
    if not with_regions:
        return processor(images=images, text=captions)
    boxes = [[[0, 0, 16, 16], [4, 4, 30, 30]] for _ in images]
    region_text = [["a small red star", "a large blue square"] for _ in images]
    return processor(images=images, text=captions, boxes=boxes, region_text=region_text)


@pytest.mark.parametrize("with_regions", [False, True])
def test_every_trainable_parameter_gets_a_gradient(with_regions):
    torch.manual_seed(0)
    model, processor = tiny_mmgem()
    batch = _training_batch(processor, with_regions=with_regions)
    output = model(**batch)
    output.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not no_grad, no_grad
    n_visual = 4 + (8 if with_regions else 0)
    assert output.logits_per_image.shape == (n_visual, n_visual)
    assert output.image_embeds.shape == output.text_embeds.shape == (n_visual, model.config.projection_dim)
    torch.testing.assert_close(output.loss, output.loss_contrastive + output.loss_caption)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_joint_loss_is_finite(dtype):
    torch.manual_seed(0)
    model, processor = tiny_mmgem()
    model.to(dtype)
    output = model(**_training_batch(processor, with_regions=True))
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model, processor = tiny_mmgem()
    model.train()
    batch = _training_batch(processor)
    model.config.text_config.attention_dropout = 0.0
    reference = model(**batch)
    reference.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.language_model.model.gradient_checkpointing
    checkpointed = model(**batch)
    checkpointed.loss.backward()
    torch.testing.assert_close(checkpointed.loss, reference.loss)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_attention_implementations_agree(tmp_path):
    torch.manual_seed(0)
    model, processor = tiny_mmgem()
    model.save_pretrained(tmp_path)
    batch = _training_batch(processor)
    outputs = {}
    for implementation in ("sdpa", "eager"):
        loaded = MMGEMModel.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert loaded.language_model.config._attn_implementation == implementation
        assert loaded.vision_model.config._attn_implementation == implementation
        with torch.no_grad():
            outputs[implementation] = loaded(**batch)
    torch.testing.assert_close(outputs["sdpa"].loss, outputs["eager"].loss, atol=1e-5, rtol=1e-5)


def test_bfloat16_loading_and_no_split_modules(tmp_path):
    torch.manual_seed(0)
    model, processor = tiny_mmgem()
    model.save_pretrained(tmp_path)
    loaded = MMGEMModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert {"CLIPEncoderLayer", "LlamaDecoderLayer"} <= set(loaded._no_split_modules)
    with torch.no_grad():
        features = loaded.get_image_features(pixel_values=processor(images=random_images(2))["pixel_values"])
    assert features.pooler_output.dtype == torch.bfloat16 and torch.isfinite(features.pooler_output.float()).all()


def test_resize_token_embeddings_resizes_the_lm_head(tiny):
    torch.manual_seed(0)
    model, _ = tiny_mmgem()
    old = model.get_output_embeddings().weight.shape[0]
    model.resize_token_embeddings(old + 5, mean_resizing=False)
    assert model.get_output_embeddings().weight.shape[0] == old + 5
    assert model.config.text_config.vocab_size == old + 5


def test_overfits_eight_image_caption_pairs():
    """A tiny model memorises 8 pairs: perfect in-batch retrieval both ways and exact greedy captions."""
    torch.manual_seed(0)
    captions = [
        "a red circle",
        "a blue square",
        "a green star",
        "a yellow triangle",
        "a small purple circle",
        "a large orange square",
        "a blue circle on the left",
        "a red star on the right",
    ]
    model, processor = tiny_mmgem(texts=captions, projection_type="linear")
    images = random_images(8, seed=1)
    batch = processor(images=images, text=captions)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        output = model(**batch)
        generated = model.generate(**processor(images=images), max_new_tokens=12)
    assert (output.logits_per_image.argmax(1) == torch.arange(8)).all()
    assert (output.logits_per_text.argmax(1) == torch.arange(8)).all()
    assert processor.decode_captions(generated) == captions


# ------------------------------------------------------------------------------------------ save / load
def _outputs(model, processor):
    with torch.no_grad():
        images = random_images(2)
        return {
            "image": model.get_image_features(**_pixels(processor, images)).pooler_output,
            "text": model.get_text_features(**processor(text=["a red circle", "blue"])).pooler_output,
            "logits": model(**processor(images=images, text=["a red circle", "blue"])).logits,
            "caption": model.generate(**processor(images=images), max_new_tokens=5),
        }


def test_round_trip_through_auto_classes_without_the_project_installed(tiny, tmp_path):
    """The saved folder carries its code: it loads where `modeling_mmgem` cannot be imported."""
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
    for name in ("configuration_mmgem.py", "modeling_mmgem.py", "processing_mmgem.py", "loss_mmgem.py"):
        assert (tmp_path / name).exists(), name
    expected = _outputs(model, processor)
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path = [p for p in sys.path if p not in ("", ".", {str(REPO_ROOT)!r})]
        sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        try:
            import modeling_mmgem  # noqa: F401
            raise SystemExit("the project is importable: the test would prove nothing")
        except ImportError:
            pass
        import torch
        from PIL import Image
        from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
        folder = {str(tmp_path)!r}
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)) is type(model)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        expected = torch.load(folder + "/expected.pt")
        import numpy as np
        rng = np.random.RandomState(0)
        sizes = ((40, 50), (32, 32))
        images = [Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
        with torch.no_grad():
            got = {{
                "image": model.get_image_features(pixel_values=processor(images=images)["pixel_values"]).pooler_output,
                "text": model.get_text_features(**processor(text=["a red circle", "blue"])).pooler_output,
                "logits": model(**processor(images=images, text=["a red circle", "blue"])).logits,
                "caption": model.generate(**processor(images=images), max_new_tokens=5),
            }}
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], msg=key)
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


def test_loaded_weights_are_not_reinitialised(tiny, tmp_path):
    model, _ = tiny
    with torch.no_grad():
        model.logit_scale.log_value.fill_(1.234)
    model.save_pretrained(tmp_path)
    loaded = MMGEMModel.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        model.logit_scale.log_value.fill_(model.config.logit_scale_init_value)


def _save_with_a_scalar_temperature(model, folder: Path, value: float) -> None:
    """`model` saved as folders were before the temperature had shape (1,): `logit_scale.log_value` of shape ()."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    assert weights["logit_scale.log_value"].shape == (1,)
    weights["logit_scale.log_value"] = torch.tensor(value)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_folders_saved_with_a_scalar_temperature_still_load(tiny, tmp_path):
    model, processor = tiny
    _save_with_a_scalar_temperature(model, tmp_path, 2.5)
    processor.save_pretrained(tmp_path)
    loaded = MMGEMModel.from_pretrained(tmp_path)  # raises on a size mismatch without the upgrade
    assert loaded.logit_scale.log_value.shape == (1,) and loaded.logit_scale.log_value.item() == 2.5
    assert loaded.logit_scale().shape == ()  # the temperature callers get is 0-d, as before
    state = model.state_dict() | {"logit_scale.log_value": torch.tensor(1.5)}
    loaded.load_state_dict(state)  # torch's route (PEFT adapters, accelerate) upgrades too
    assert loaded.logit_scale.log_value.item() == 1.5
    # A user without the project: the Hub copy of the code upgrades the old folder, and saving writes shape (1,).
    script = f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert model.logit_scale.log_value.tolist() == [2.5], model.logit_scale.log_value
        model.save_pretrained({str(tmp_path / "resaved")!r})
        saved = load_file({str(tmp_path / "resaved" / "model.safetensors")!r})["logit_scale.log_value"]
        assert saved.shape == (1,) and saved.tolist() == [2.5], saved
        print("OK")
    """
    run_outside(script, tmp_path)


def test_config_round_trip_keeps_sub_configs(tmp_path):
    config = MMGEMConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "num_attention_heads": 4,
            "vision_use_head": False,
        },
        text_config={"model_type": "qwen2", "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2},
        pool_grid_size=2,
        projection_type="linear",
    )
    config.save_pretrained(tmp_path)
    loaded = MMGEMConfig.from_pretrained(tmp_path)
    assert loaded.vision_config.model_type == "siglip_vision_model" and loaded.text_config.model_type == "qwen2"
    assert loaded.pool_grid_size == 2 and loaded.projection_type == "linear" and loaded.num_image_tokens == 4


def test_generate_never_emits_special_tokens(tiny, images):
    """Even a model that prefers `<image>` / `[EMB]` / `[CAP]` writes captions without them (a generated
    `<image>` would otherwise be taken for a placeholder on the next step)."""
    model, processor = tiny
    special = [model.config.image_token_id, model.config.emb_token_id, model.config.cap_token_id]

    def favour_special_tokens(module, args, logits):
        logits = logits.clone()
        logits[..., special] += 1e4
        return logits

    handle = model.language_model.lm_head.register_forward_hook(favour_special_tokens)
    try:
        inputs = processor(images=images[:2])
        with torch.no_grad():
            cached = model.generate(**inputs, max_new_tokens=4)
            uncached = model.generate(**inputs, max_new_tokens=4, use_cache=False)
    finally:
        handle.remove()
    new_tokens = cached[:, inputs["input_ids"].shape[1] :]
    assert new_tokens.shape[1] == 4 and not torch.isin(new_tokens, torch.tensor(special)).any()
    assert torch.equal(cached, uncached)
