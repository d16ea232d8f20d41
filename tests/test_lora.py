"""PEFT LoRA on MM-GEM: the config hits the language model only, trains with the joint loss through the HF Trainer,
saves / reloads with zero missing or unexpected keys, merges to the same outputs, and pushes / pulls by repo id."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import AutoPeftModel, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor, Trainer, TrainingArguments

from mmgem.build import build_mmgem, tiny_configs, tiny_mmgem, train_tokenizer
from mmgem.integrations.lora import (
    PROJECTION_MODULES,
    adapter_key_mismatch,
    apply_lora,
    count_parameters,
    language_model_target_regex,
    load_lora_adapter,
    mmgem_lora_config,
    new_token_ids,
)
from mmgem.training.freezing import freeze
from tests.conftest import random_images


@torch.no_grad()
def lora_weights_changed(peft_model, adapter_name: str = "default") -> bool:
    """Whether any LoRA `B` matrix is non-zero, i.e. the adapter differs from the base (PEFT initialises B to 0)."""
    return any(
        parameter.abs().sum().item() > 0
        for name, parameter in peft_model.named_parameters()
        if ".lora_B." in name and name.endswith(f"{adapter_name}.weight")
    )


# transformers 5.24 renamed TrainingArguments' gradient_checkpointing to activation_checkpointing (the old name warns).
CHECKPOINTING_ARGUMENT = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)
CAPTIONS = ["a small red circle on the left", "a large blue square", "a green star on the top", "a yellow triangle"]
LM_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model, processor = tiny_mmgem()
    path = tmp_path_factory.mktemp("lora") / "base"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def processor(folder):
    return AutoProcessor.from_pretrained(folder, trust_remote_code=True)


@pytest.fixture(scope="module")
def batch(processor):
    return processor(images=random_images(4, seed=1), text=CAPTIONS)


def load_base(folder):
    """A fresh remote-code base model, as a user would load it."""
    return AutoModel.from_pretrained(folder, trust_remote_code=True)


def lora_wrapped(peft_model) -> list[str]:
    """Names (inside the base model) of the modules PEFT put a LoRA layer on."""
    prefix = "base_model.model."
    return [name.removeprefix(prefix) for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]


def outputs(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    return out


def assert_same_outputs(a, b, atol=1e-5):
    for name in ("text_embeds", "image_embeds", "logits", "loss"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=atol, rtol=0, msg=name)


def train_steps(peft_model, processor, output_dir, steps=8, gradient_checkpointing=False):
    """A few Trainer steps on one repeated batch of 4 image-caption pairs with the joint loss."""
    items = [{"image": image, "caption": caption} for image, caption in zip(random_images(4, seed=1), CAPTIONS)]

    def collate(batch_items):
        return dict(processor(images=[x["image"] for x in batch_items], text=[x["caption"] for x in batch_items]))

    args = TrainingArguments(
        str(output_dir),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        remove_unused_columns=False,  # the collator builds exactly the model inputs
        save_strategy="no",
        use_cpu=True,
        **{CHECKPOINTING_ARGUMENT: gradient_checkpointing},
        disable_tqdm=True,
    )
    trainer = Trainer(model=peft_model, args=args, train_dataset=items, data_collator=collate)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def trained(folder, processor, tmp_path_factory):
    """A LoRA adapter trained for a few steps and saved: (peft_model, adapter_dir, losses)."""
    torch.manual_seed(0)
    peft_model = apply_lora(load_base(folder), r=4, dropout=0.0)
    losses = train_steps(peft_model, processor, tmp_path_factory.mktemp("trainer"))
    adapter_dir = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(adapter_dir)
    return peft_model.eval(), adapter_dir, losses


# ------------------------------------------------------------------------------------------------ config
def test_config_hits_only_language_model_linears(folder):
    model = load_base(folder)
    config = mmgem_lora_config(model, r=4)
    assert isinstance(config, LoraConfig) and config.task_type is None
    assert config.lora_alpha == 8
    peft_model = get_peft_model(model, config)
    wrapped = lora_wrapped(peft_model)
    assert wrapped and all(name.startswith("language_model.model.layers.") for name in wrapped)
    assert not any(name.startswith("vision_model") for name in wrapped)
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == LM_LINEARS
    assert len(wrapped) == len(LM_LINEARS) * model.config.text_config.num_hidden_layers
    # Only the adapter, the saved modules and the new token rows train; the vision tower stays frozen.
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert all(".lora_" in n or ".modules_to_save." in n or ".token_adapter." in n for n in trainable), trainable
    assert not any("vision_model" in name for name in trainable)
    for module in PROJECTION_MODULES:
        assert any(f"{module}.modules_to_save." in name for name in trainable), module
    assert config.trainable_token_indices == {"language_model.model.embed_tokens": new_token_ids(model)}
    assert new_token_ids(model) == [model.config.emb_token_id, model.config.cap_token_id]


def test_naive_target_names_would_hit_the_vision_tower(folder):
    """Why the config uses a regex: the vision attention shares q_proj / v_proj with the language model."""
    model = load_base(folder)
    naive = get_peft_model(load_base(folder), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert any(name.startswith("vision_model") for name in lora_wrapped(naive))
    regex = language_model_target_regex(model, ["q_proj", "v_proj"])
    ours = get_peft_model(model, mmgem_lora_config(model, r=4, target_modules=["q_proj", "v_proj"]))
    assert ours.peft_config["default"].target_modules == regex
    wrapped = lora_wrapped(ours)
    assert len(wrapped) == 4 and all(name.startswith("language_model.") for name in wrapped)


def test_config_works_for_siglip_and_qwen2():
    model, _ = tiny_mmgem(vision="siglip", text="qwen2")
    peft_model = apply_lora(model, r=2)
    wrapped = lora_wrapped(peft_model)
    assert wrapped and all(name.startswith("language_model.model.layers.") for name in wrapped)


def test_vision_tower_frozen_by_default_and_unfreezable(folder):
    lora_vision = apply_lora(load_base(folder), r=2, train_vision="lora")
    wrapped = lora_wrapped(lora_vision)
    assert any(name.startswith("vision_model.encoder.") for name in wrapped)
    assert any(name.startswith("language_model.") for name in wrapped)
    assert not any("lm_head" in name for name in wrapped)

    full = apply_lora(load_base(folder), r=2, train_vision="full")
    assert "vision_model" in full.peft_config["default"].modules_to_save
    vision_params = [p for n, p in full.named_parameters() if "vision_model.modules_to_save" in n]
    assert vision_params and all(p.requires_grad for p in vision_params)

    model = load_base(folder)  # without PEFT: the freezing helpers
    freeze(model, vision=True)
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    assert all(p.requires_grad for p in model.language_model.parameters())  # None: left as it is
    counts = count_parameters(model)
    assert 0 < counts["trainable"] < counts["total"]
    freeze(model, vision=False)
    assert all(p.requires_grad for p in model.vision_model.parameters())


def test_config_rejects_bad_arguments(folder):
    model = load_base(folder)
    with pytest.raises(ValueError, match="target_modules"):
        mmgem_lora_config(model, target_modules=["fc1"])  # a vision layer name
    with pytest.raises(ValueError, match="target_modules"):
        mmgem_lora_config(model, target_modules="q_proj")
    with pytest.raises(ValueError, match="`r`"):
        mmgem_lora_config(model, r=0)
    with pytest.raises(ValueError, match="dropout"):
        mmgem_lora_config(model, dropout=1.5)
    with pytest.raises(ValueError, match="train_vision"):
        mmgem_lora_config(model, train_vision="partial")
    with pytest.raises(ValueError, match="modules_to_save"):
        mmgem_lora_config(model, extra_modules_to_save=["layers"])  # matches many modules
    with pytest.raises(ValueError, match="model"):
        mmgem_lora_config(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="config"):
        apply_lora(model, config=mmgem_lora_config(model), r=4)


# ------------------------------------------------------------------------------------------------ training
def test_trainer_trains_with_the_joint_loss(trained, folder, batch):
    peft_model, _, losses = trained
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert lora_weights_changed(peft_model)
    base = load_base(folder)
    inner = peft_model.get_base_model()
    # Trained: the saved copies of the projections / temperature and the [EMB] / [CAP] rows; frozen: the rest.
    trained_proj = inner.text_projection.modules_to_save["default"].layers[0].weight
    assert not torch.equal(trained_proj, base.text_projection.layers[0].weight)
    assert not torch.equal(inner.logit_scale.modules_to_save["default"].log_value, base.logit_scale.log_value)
    delta = inner.get_input_embeddings().token_adapter.trainable_tokens_delta["default"]
    assert delta.abs().sum() > 0
    for (name, p), (_, p0) in zip(inner.vision_model.named_parameters(), base.vision_model.named_parameters()):
        assert torch.equal(p, p0), name
    # The embedding matrix itself is untouched; only the rows of [EMB] and [CAP] have a trained delta.
    torch.testing.assert_close(inner.get_input_embeddings().original_module.weight, base.get_input_embeddings().weight)
    assert delta.shape[0] == 2


def test_gradient_checkpointing_with_lora(folder, batch, tmp_path):
    torch.manual_seed(0)
    plain = apply_lora(load_base(folder), r=4, dropout=0.0).train()
    torch.manual_seed(0)
    checkpointed = apply_lora(load_base(folder), r=4, dropout=0.0, gradient_checkpointing=True).train()
    assert checkpointed.get_base_model().language_model.model.gradient_checkpointing
    for model in (plain, checkpointed):
        for p in model.parameters():  # LoRA B starts at zero: give A a gradient too
            if p.requires_grad and p.ndim == 2:
                torch.nn.init.normal_(p, std=0.02)
    checkpointed.load_state_dict(plain.state_dict())
    loss_plain = plain(**batch).loss
    loss_plain.backward()
    loss_checkpointed = checkpointed(**batch).loss
    loss_checkpointed.backward()
    torch.testing.assert_close(loss_checkpointed, loss_plain)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for name, p in checkpointed.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-4, msg=name)
    # And through the Trainer's own switch.
    trainer_model = apply_lora(load_base(folder), r=4)
    losses = train_steps(
        trainer_model, AutoProcessor.from_pretrained(folder, trust_remote_code=True), tmp_path, 2, True
    )
    assert len(losses) == 2 and lora_weights_changed(trainer_model)


# ------------------------------------------------------------------------------------------------ save / reload / merge
def test_adapter_reloads_with_zero_missing_or_unexpected_keys(trained, folder, batch):
    peft_model, adapter_dir, _ = trained
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    assert any("modules_to_save" not in k and "image_projection" in k for k in saved)
    assert any("logit_scale" in k for k in saved) and any("trainable_tokens_delta" in k for k in saved)
    assert not any("vision_model" in k for k in saved)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded = PeftModel.from_pretrained(load_base(folder), adapter_dir)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    result = reloaded.load_adapter(adapter_dir, adapter_name="again")
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert adapter_key_mismatch(reloaded, adapter_dir) == ([], [])
    reloaded.set_adapter("default")
    assert_same_outputs(outputs(reloaded, batch), outputs(peft_model, batch), atol=1e-6)
    # The adapter really changes the model.
    base_out = outputs(load_base(folder), batch)
    assert (base_out.text_embeds - outputs(peft_model, batch).text_embeds).abs().max() > 1e-3

    strict = load_lora_adapter(folder, adapter_dir)
    assert_same_outputs(outputs(strict, batch), outputs(peft_model, batch), atol=1e-6)


def test_adapter_loads_through_auto_classes(trained, folder, batch):
    peft_model, adapter_dir, _ = trained
    expected = outputs(peft_model, batch)
    auto_model = AutoModel.from_pretrained(adapter_dir, trust_remote_code=True)
    assert_same_outputs(outputs(auto_model, batch), expected, atol=1e-6)
    # The adapter names transformers.AutoModel as its base class, so PEFT's default import allowlist suffices.
    auto_peft = AutoPeftModel.from_pretrained(adapter_dir, trust_remote_code=True)
    assert_same_outputs(outputs(auto_peft, batch), expected, atol=1e-6)


def test_strict_loading_rejects_a_mismatched_adapter(trained, folder, tmp_path):
    _, adapter_dir, _ = trained
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((adapter_dir / "adapter_config.json").read_bytes())
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    dropped = next(k for k in weights if "lora_A" in k)
    del weights[dropped]
    save_file(weights, broken / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="missing keys"):
        load_lora_adapter(folder, broken)
    assert load_lora_adapter(folder, broken, strict=False) is not None


def test_merge_and_unload_gives_the_same_outputs_and_saves(trained, folder, batch, tmp_path, processor):
    peft_model, adapter_dir, _ = trained
    expected = outputs(peft_model, batch)
    merged = load_lora_adapter(folder, adapter_dir).merge_and_unload()
    assert type(merged).__name__ == "MMGEMModel"
    assert not any("lora_" in name or "modules_to_save" in name for name, _ in merged.named_parameters())
    assert_same_outputs(outputs(merged, batch), expected, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    processor.save_pretrained(tmp_path / "merged")
    reloaded = AutoModel.from_pretrained(tmp_path / "merged", trust_remote_code=True)
    assert_same_outputs(outputs(reloaded, batch), expected, atol=1e-5)
    with torch.no_grad():  # captioning still works on the merged model
        generated = reloaded.generate(pixel_values=batch["pixel_values"][:1], max_new_tokens=3, do_sample=False)
    assert generated.shape[0] == 1


@pytest.fixture(scope="module")
def tied_folder(tmp_path_factory):
    """A tiny MM-GEM whose language model ties lm_head to the input embeddings (as SmolLM or Qwen2-0.5B do)."""
    vision_config, text_config = tiny_configs()
    text_config["tie_word_embeddings"] = True
    torch.manual_seed(0)
    model, processor = build_mmgem(vision_config, text_config, train_tokenizer(CAPTIONS * 4, 300), pool_grid_size=2)
    path = tmp_path_factory.mktemp("tied") / "base"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def train_a_little(peft_model, batch, steps=3):
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(steps):
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return peft_model.eval()


def test_tied_embeddings_train_save_reload_and_merge_consistently(tied_folder, tmp_path):
    processor = AutoProcessor.from_pretrained(tied_folder, trust_remote_code=True)
    batch = processor(images=random_images(4, seed=1), text=CAPTIONS)
    base = load_base(tied_folder)
    assert base.language_model.lm_head.weight is base.get_input_embeddings().weight
    peft_model = train_a_little(apply_lora(base, r=4, dropout=0.0), batch)
    # The [EMB] / [CAP] rows of the tied lm_head follow the trained embedding rows.
    assert type(peft_model.get_base_model().language_model.lm_head).__name__ == "TrainableTokensWrapper"
    expected = outputs(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = load_lora_adapter(tied_folder, tmp_path / "adapter")
    assert_same_outputs(outputs(reloaded, batch), expected, atol=1e-6)
    merged = reloaded.merge_and_unload()
    assert merged.language_model.lm_head.weight is merged.get_input_embeddings().weight
    assert_same_outputs(outputs(merged, batch), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------ hub
def test_adapter_push_and_pull_by_repo_id(trained, folder, batch, fake_hub, tmp_path):
    from huggingface_hub import HfApi

    peft_model, _, _ = trained
    expected = outputs(peft_model, batch)
    with fake_hub.patch(token=True, cache_dir=tmp_path / "hf-cache"):
        api = HfApi()
        api.create_repo("user/tiny-mmgem")
        api.upload_folder(repo_id="user/tiny-mmgem", folder_path=str(folder))
        base = AutoModel.from_pretrained("user/tiny-mmgem", trust_remote_code=True)
        # An adapter made on the repo-id base records the repo id, so it pulls its base from the Hub.
        hub_peft = apply_lora(base, r=4, dropout=0.0)
        hub_peft.load_state_dict(peft_model.state_dict())
        hub_peft.push_to_hub("user/tiny-mmgem-lora")
        assert "adapter_model.safetensors" in fake_hub.files("user/tiny-mmgem-lora")

        pulled = load_lora_adapter("user/tiny-mmgem", "user/tiny-mmgem-lora")
        assert_same_outputs(outputs(pulled, batch), expected, atol=1e-6)
        auto_model = AutoModel.from_pretrained("user/tiny-mmgem-lora", trust_remote_code=True)
        assert_same_outputs(outputs(auto_model, batch), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------ export
def test_merged_model_and_adapter_export_with_the_conversion_script(trained, folder, batch, tmp_path, processor):
    from sentence_transformers import SentenceTransformer

    from mmgem.conversion.convert_mmgem import export_checkpoint

    peft_model, adapter_dir, _ = trained
    expected = outputs(peft_model, batch)
    merged = load_lora_adapter(folder, adapter_dir).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    processor.save_pretrained(tmp_path / "merged")
    exports = {
        "merged": export_checkpoint(tmp_path / "merged", tmp_path / "export-merged", verify=False),
        # The script also takes the adapter itself (it merges it on the way); its base comes from adapter_config.json.
        "adapter": export_checkpoint(adapter_dir, tmp_path / "export-adapter", verify=False),
    }
    for name, exported in exports.items():
        reloaded = AutoModel.from_pretrained(exported, trust_remote_code=True)
        assert_same_outputs(outputs(reloaded, batch), expected, atol=1e-5)
        st = SentenceTransformer(str(exported), trust_remote_code=True)  # exported folders are ST models too
        embeddings = st.encode(CAPTIONS, convert_to_tensor=True)
        torch.testing.assert_close(embeddings, expected.text_embeds, atol=1e-5, rtol=0, msg=name)


AUTO_PEFT_SCRIPT = """
import json, torch
from peft import AutoPeftModel
from transformers import AutoProcessor
adapter, base, expected_file = {adapter!r}, {base!r}, {expected!r}
assert json.load(open(adapter + "/adapter_config.json"))["auto_mapping"]["parent_library"].startswith("transformers.")
model = AutoPeftModel.from_pretrained(adapter, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(base, trust_remote_code=True)
with torch.no_grad():
    got = model.get_text_features(**processor(text=["a red circle", "two blue squares"])).pooler_output
torch.testing.assert_close(got, torch.load(expected_file), rtol=0, atol=1e-5)
print("OK")
"""


def auto_peft_outside(adapter_dir, base_folder, expected: torch.Tensor, tmp_path) -> None:
    """`AutoPeftModel.from_pretrained(adapter, trust_remote_code=True)` where mmgem is not installed gives
    `expected` text embeddings."""
    from .outside import run_outside

    torch.save(expected, tmp_path / "expected.pt")
    expected_file = str(tmp_path / "expected.pt")
    run_outside(
        AUTO_PEFT_SCRIPT.format(adapter=str(adapter_dir), base=str(base_folder), expected=expected_file), tmp_path
    )


def test_auto_peft_model_loads_in_a_fresh_process(trained, folder, processor, tmp_path):
    peft_model, adapter_dir, _ = trained
    with torch.no_grad():
        expected = peft_model.get_text_features(**processor(text=["a red circle", "two blue squares"])).pooler_output
    auto_peft_outside(adapter_dir, folder, expected, tmp_path)


def test_all_linear_targets_are_warned_about(folder):
    with pytest.warns(UserWarning, match="vision tower.*mmgem_lora_config"):
        apply_lora(load_base(folder), config=LoraConfig(r=2, target_modules="all-linear"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lora(load_base(folder), r=2)  # the MM-GEM config: no warning
    assert not [w for w in caught if "all-linear" in str(w.message)]


# ------------------------------------------------------------------------------------------------ prompt learning
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_prompt_learning_finds_the_language_models_word_embeddings(folder, processor, method, tmp_path):
    """PEFT's prompt tuning and P-tuning take the first pretrained child as the backbone and its vocabulary-sized
    parameter as the word embeddings: that must be the language model's table (not something in the vision tower).
    A few steps on captions train the virtual tokens only; the saved adapter reloads to the same outputs."""
    from peft import PromptEncoderConfig, PromptTuningConfig

    torch.manual_seed(0)
    base = load_base(folder)
    config = (
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
        if method == "prompt_tuning"
        else PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16)
    )
    peft_model = get_peft_model(base, config)
    assert peft_model.word_embeddings is base.get_input_embeddings()
    assert peft_model.transformer_backbone_name == "language_model"
    frozen = {name: p.detach().clone() for name, p in base.named_parameters()}
    inputs = processor.tokenizer(CAPTIONS, return_tensors="pt", padding=True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(3):
        loss = peft_model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[name]) for name, p in base.named_parameters())  # only the prompt trained
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_base(folder), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=0, atol=1e-6)
