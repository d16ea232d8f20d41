"""mmgem.conversion (`mmgem convert` / `mmgem-convert`): compose, export, reload and push MM-GEMs built from tiny
components saved in the real formats (CLIP, SigLIP full and vision-only, Llama, Qwen2),
through a real HTTP fake Hub on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import HfApi, ModelCard, ModelCardData, constants
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoProcessor

from mmgem.build import DEFAULT_CORPUS, train_tokenizer
from mmgem.conversion import HubPushError, convert, export_checkpoint, main, push_folder
from mmgem.conversion import publish as publish_module
from mmgem.conversion.components import compose
from mmgem.conversion.publish import hub_id_of
from modeling_mmgem.modeling_mmgem import MMGEMModel
from tests.hub_server import FakeHub

ROOT = Path(__file__).resolve().parents[1]
MMGEM_OPTIONS = dict(pool_grid_size=2, projection_dim=16)
CLI_OPTIONS = ["--pool-grid-size", "2", "--projection-dim", "16"]
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
# Keys of a full CLIP / SigLIP checkpoint that an MM-GEM does not use, as transformers reports them.
CLIP_TEXT = ["logit_scale", "text_projection.weight", "visual_projection.weight"]
SIGLIP_TEXT = ["logit_bias", "logit_scale"]
SIGLIP_HEAD = [
    "head.attention.in_proj_bias",
    "head.attention.in_proj_weight",
    "head.attention.out_proj.bias",
    "head.attention.out_proj.weight",
    "head.layernorm.bias",
    "head.layernorm.weight",
    "head.mlp.fc1.bias",
    "head.mlp.fc1.weight",
    "head.mlp.fc2.bias",
    "head.mlp.fc2.weight",
    "head.probe",
]


# ---------------------------------------------------------------------------------------------- source folders
def _write_card(folder: Path, license: str) -> None:
    card = ModelCard.from_template(ModelCardData(license=license), template_str="---\n{{ card_data }}\n---\n# tiny\n")
    card.save(folder / "README.md")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random components saved with save_pretrained, with their image processors / tokenizers."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    text = dict(vocab_size=99, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, **COMMON)
    vision = dict(image_size=32, patch_size=8, **COMMON)
    paths = {name: root / name for name in ("clip", "siglip", "siglip-vision", "llama", "qwen2")}
    clip = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    clip.save_pretrained(paths["clip"])
    transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(paths["clip"])
    siglip = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
    siglip.save_pretrained(paths["siglip"])
    transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(paths["siglip"])
    # Vision-only, with its (unused) attention-pooling head and no image processor config.
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision)).save_pretrained(paths["siglip-vision"])
    tokenizer = train_tokenizer(DEFAULT_CORPUS, vocab_size=300)
    lm = dict(
        vocab_size=len(tokenizer),
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **COMMON,
    )
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**lm)).save_pretrained(paths["llama"])
    qwen2 = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(tie_word_embeddings=True, **lm))
    qwen2.to(torch.bfloat16).save_pretrained(paths["qwen2"])  # a second family, tied, in another dtype
    for name in ("llama", "qwen2"):
        tokenizer.save_pretrained(paths[name])
    _write_card(paths["clip"], "mit")
    _write_card(paths["llama"], "mit")
    return paths


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as fake_hub:
        yield fake_hub


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmgem.conversion.convert_mmgem", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )


def _folder_text(folder: Path) -> str:
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file())


def _no_partial_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def pushed(sources, hub, tmp_path_factory) -> dict:
    """The CLI converts CLIP + Llama, reloads the result in a fresh process and pushes it (one subprocess)."""
    output = tmp_path_factory.mktemp("cli") / "tiny-mmgem"
    args = ["--vision-model", str(sources["clip"]), "--language-model", str(sources["llama"])]
    args += ["--output-dir", str(output), "--push-to-hub", "user/tiny-mmgem", "--private", *CLI_OPTIONS]
    args += ["--base-model-ids", "openai/clip-vit-large-patch14", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"]
    env = hub.env(token=True)
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "0"  # the fake hub's env turns them off; the user sees them
    result = _cli(args, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"output": output, "result": result}


# ---------------------------------------------------------------------------------------------- fresh conversions
def test_cli_writes_one_complete_hub_folder(pushed):
    output, result = pushed["output"], pushed["result"]
    for step in (
        "Loading the vision tower",
        "Loading the language model",
        "Parity checks passed",
        "Reload check passed",
    ):
        assert step in result.stderr
    assert "Loading weights" in result.stderr and "Writing model shards" in result.stderr  # progress bars
    names = {p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "configuration_mmgem.py",
        "modeling_mmgem.py",
        "processing_mmgem.py",
        "loss_mmgem.py",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
        "1_Normalize/config.json",
        "README.md",
    } <= names
    config = json.loads((output / "config.json").read_text())
    assert {"AutoConfig", "AutoModel"} <= set(config["auto_map"])
    assert json.loads((output / "processor_config.json").read_text())["auto_map"]["AutoProcessor"]
    generation = json.loads((output / "generation_config.json").read_text())
    assert generation["max_new_tokens"] == 64 and generation["pad_token_id"] == config["text_config"]["pad_token_id"]
    assert _no_partial_left(output.parent)


def test_model_card_metadata_and_usage(pushed, sources):
    card = ModelCard.load(pushed["output"] / "README.md")
    assert str(sources["clip"].parent) not in card.content  # no local paths in a public card
    assert "a local folder `clip`" in card.text
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "feature-extraction"
    assert card.data.license == "mit"  # both source cards say mit
    assert card.data.base_model == ["openai/clip-vit-large-patch14", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"]
    assert {"mmgem", "sentence-transformers", "image-captioning"} <= set(card.data.tags)
    for usage in ('AutoModel.from_pretrained("user/tiny-mmgem"', "SentenceTransformer(", "LoraConfig(", "Untrained"):
        assert usage in card.text


def test_push_then_load_by_repo_id(pushed, hub, tmp_path):
    assert hub.commits("user/tiny-mmgem")[0] == "Upload MM-GEM converted with mmgem"
    assert len(hub.commits("user/tiny-mmgem")) == 2  # the repo's initial commit + ONE upload commit
    local = {p.relative_to(pushed["output"]).as_posix() for p in pushed["output"].rglob("*") if p.is_file()}
    assert set(hub.files("user/tiny-mmgem")) - {".gitattributes"} == local  # .gitattributes: the initial commit
    with hub.patch(token=True, cache_dir=tmp_path / "cache"):
        assert HfApi().model_info("user/tiny-mmgem").private
        model = AutoModel.from_pretrained("user/tiny-mmgem", trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained("user/tiny-mmgem", trust_remote_code=True)
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer("user/tiny-mmgem", trust_remote_code=True, device="cpu")
    texts = ["a small red circle on the left", "a large blue star on the top"]
    with torch.no_grad():
        expected = model.get_text_features(**processor(text=texts)).pooler_output
    embeddings = st.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(embeddings, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5, rtol=1e-4)


def test_token_is_never_printed_or_written(pushed, hub):
    assert hub.token not in pushed["result"].stdout + pushed["result"].stderr
    assert hub.token not in _folder_text(pushed["output"])
    assert all(hub.token.encode() not in content for content in hub.files("user/tiny-mmgem").values())


@pytest.mark.parametrize(
    ("vision", "language", "dropped"),
    [
        ("clip", "llama", CLIP_TEXT),
        ("siglip", "qwen2", SIGLIP_TEXT + SIGLIP_HEAD),
        ("siglip-vision", "llama", SIGLIP_HEAD),
    ],
)
def test_composition_matches_the_source_components(sources, vision, language, dropped):
    composition = compose(str(sources[vision]), str(sources[language]), **MMGEM_OPTIONS)
    model = composition.model
    # Exactly the unused parts are dropped: the other tower, the projections, SigLIP's pooling head.
    assert [k for k in composition.dropped_keys if not k.startswith("text_model.")] == sorted(dropped)
    full = vision in ("clip", "siglip")
    assert any(k.startswith("text_model.") for k in composition.dropped_keys) == full
    assert {k.split(".")[0] for k in composition.new_keys} == {
        "image_projection",
        "visual_token_projection",
        "text_projection",
        "logit_scale",
    }
    # Independent loads of the sources with their own classes give the same outputs (in the composed dtype: an fp32
    # tower with a bf16 LM is stored as an exact fp32 upcast).
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        source_vision = transformers.AutoModel.from_pretrained(sources[vision], dtype=model.dtype).eval()
        source_tower = source_vision.vision_model if full else source_vision
        expected = source_tower(pixel_values=pixel_values).last_hidden_state
        got = model.vision_model(pixel_values=pixel_values).last_hidden_state
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        source_lm = AutoModelForCausalLM.from_pretrained(sources[language], dtype=model.dtype).eval()
        ids = torch.randint(0, source_lm.config.vocab_size, (2, 9))
        source_logits = source_lm(input_ids=ids).logits
        logits = model.language_model(input_ids=ids).logits
    vocab = source_lm.config.vocab_size
    assert logits.shape[-1] == vocab + 3  # [EMB], [CAP], <image> (the tokenizer has a pad token)
    torch.testing.assert_close(logits[..., :vocab], source_logits, atol=0, rtol=0)
    rows = model.get_input_embeddings().weight[:vocab]
    torch.testing.assert_close(rows, source_lm.get_input_embeddings().weight, atol=0, rtol=0)
    if language == "qwen2":  # tied: still tied after resizing; fp32 vision + bf16 LM -> exact upcast to fp32
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert model.dtype == torch.float32 and composition.notes


@pytest.mark.parametrize("language", ["llama", "qwen2"])  # untied fp32, tied bf16
def test_new_token_rows_start_at_the_vocabulary_mean(sources, language):
    """The rows added for [EMB], [CAP], <image> (and pad) start at the mean of the vocabulary's rows (transformers'
    mean-resizing), input and output embeddings alike: the new tokens' logits are the vocabulary's mean logit, so the
    composed language model continues a text exactly as the source LM does."""
    composition = compose(str(sources["clip"]), str(sources[language]), **MMGEM_OPTIONS)
    model = composition.model
    source_lm = AutoModelForCausalLM.from_pretrained(sources[language], dtype=model.dtype).eval()
    vocab = source_lm.config.vocab_size
    for name in ("get_input_embeddings", "get_output_embeddings"):
        rows = getattr(model, name)().weight.float()
        assert rows.shape[0] == vocab + 3
        mean = getattr(source_lm, name)().weight.float().mean(0)
        # bf16 rows: the mean rounded to bf16; the sampling noise of mean-resizing is 1e-9 * covariance
        torch.testing.assert_close(rows[vocab:], mean.expand(3, -1), atol=1e-2 * mean.abs().max().item(), rtol=1e-2)
    prompts = torch.randint(3, vocab, (4, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = source_lm.generate(prompts, max_new_tokens=12, do_sample=False, pad_token_id=0)
        got = model.language_model.generate(prompts, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)


def test_siglip_and_qwen2_bf16_sharded(sources, tmp_path):
    output = convert(
        str(sources["siglip"]),
        str(sources["qwen2"]),
        tmp_path / "out",
        dtype="bfloat16",
        max_shard_size="100KB",
        **MMGEM_OPTIONS,
    )
    index = json.loads((output / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((output / shard).is_file() for shard in shards)
    with safe_open(output / sorted(shards)[0], "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"
    card = ModelCard.load(output / "README.md")
    assert card.data.license == "other" and "licenses could not be read" in card.text
    assert card.data.base_model is None  # local folders: no Hub id to name


def test_language_model_by_hub_id(sources, hub, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    api.create_repo("user/tiny-llama")
    api.upload_folder(repo_id="user/tiny-llama", folder_path=sources["llama"])
    with hub.patch(token=True, cache_dir=tmp_path / "cache"):
        output = convert(
            str(sources["siglip-vision"]), "user/tiny-llama", tmp_path / "out", verify=False, **MMGEM_OPTIONS
        )
    assert ModelCard.load(output / "README.md").data.base_model == ["user/tiny-llama"]
    model = MMGEMModel.from_pretrained(output)
    assert model.config.vision_config.vision_use_head is False and not hasattr(model.vision_model, "head")


# ---------------------------------------------------------------------------------------------- checkpoints
def _mmgem_state(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_export_trainer_checkpoint(pushed, tmp_path):
    run = tmp_path / "run"
    model = MMGEMModel.from_pretrained(pushed["output"])
    with torch.no_grad():
        model.text_projection.layers[0].weight.add_(1.0)  # "training"
    model.save_pretrained(run / "checkpoint-10")  # as the Trainer: no processor in the checkpoint
    AutoProcessor.from_pretrained(pushed["output"], trust_remote_code=True).save_pretrained(run)
    # The processor is found in the run folder; the base's model card gives the base models. (The reload check in a
    # fresh process is exercised by the other exports; skipped here to keep the suite fast.)
    output = export_checkpoint(
        run / "checkpoint-10", tmp_path / "export", base_model=str(pushed["output"]), verify=False
    )
    exported = _mmgem_state(output)
    for key, value in model.state_dict().items():
        if key in exported:
            torch.testing.assert_close(exported[key], value, atol=0, rtol=0)
    card = ModelCard.load(output / "README.md")
    assert "checkpoint-10" in card.text and "Untrained" not in card.text
    assert card.data.base_model == ["openai/clip-vit-large-patch14", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"]


def test_export_merged_lora_adapter(pushed, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = MMGEMModel.from_pretrained(pushed["output"])
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r"language_model\..*\.(q_proj|k_proj|v_proj|o_proj)",
        modules_to_save=["text_projection"],
        trainable_token_indices={"embed_tokens": [base.config.emb_token_id, base.config.cap_token_id]},
        init_lora_weights=False,  # non-zero B: the merge must matter
    )
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    output = export_checkpoint(tmp_path / "adapter", tmp_path / "merged", base_model=str(pushed["output"]))
    exported = _mmgem_state(output)
    assert not [k for k in exported if "lora" in k or "modules_to_save" in k or "trainable_tokens" in k]
    fresh = PeftModel.from_pretrained(MMGEMModel.from_pretrained(pushed["output"]), tmp_path / "adapter").eval()
    merged = MMGEMModel.from_pretrained(output).eval()
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    inputs = processor(text=["a small red circle on the left"])
    with torch.no_grad():
        torch.testing.assert_close(
            merged.get_text_features(**inputs).pooler_output, fresh.get_text_features(**inputs).pooler_output
        )


def test_export_state_dict_with_key_mapping(pushed, sources, tmp_path):
    state = {
        f"module.mmgem.{k}": v.clone() for k, v in MMGEMModel.from_pretrained(pushed["output"]).state_dict().items()
    }
    torch.save({"model": state, "step": 3}, tmp_path / "weights.pt")
    components = dict(vision_model=str(sources["clip"]), language_model=str(sources["llama"]), **MMGEM_OPTIONS)
    with pytest.raises(ValueError, match=r"unexpected_keys.*key_mapping"):
        export_checkpoint(tmp_path / "weights.pt", tmp_path / "bad", verify=False, **components)
    assert not (tmp_path / "bad").exists()
    output = export_checkpoint(
        tmp_path / "weights.pt",
        tmp_path / "out",
        key_mapping='{"^module\\\\.mmgem\\\\.": ""}',
        verify=False,
        **components,
    )
    exported = _mmgem_state(output)
    for key, value in exported.items():
        torch.testing.assert_close(value, state[f"module.mmgem.{key}"], atol=0, rtol=0)
    # A safetensors state dict in MM-GEM naming, on the architecture of an exported base model.
    torch.save(state, tmp_path / "plain.bin")
    from safetensors.torch import save_file

    save_file({k.removeprefix("module.mmgem."): v for k, v in state.items()}, tmp_path / "w.safetensors")
    output = export_checkpoint(
        tmp_path / "w.safetensors", tmp_path / "out2", base_model=str(pushed["output"]), verify=False
    )
    assert set(_mmgem_state(output)) == set(exported)


# ---------------------------------------------------------------------------------------------- refusals
@pytest.fixture()
def bad_vision(sources, tmp_path) -> callable:
    def make(**config_changes) -> str:
        folder = tmp_path / f"bad-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(sources["siglip-vision"], folder)
        config = json.loads((folder / "config.json").read_text())
        config.update(config_changes)
        (folder / "config.json").write_text(json.dumps(config))
        return str(folder)

    return make


@pytest.mark.parametrize(
    ("vision", "language", "message"),
    [
        ("llama", "llama", r"`vision_model` .* is not a supported vision model: its model_type is 'llama'"),
        ("clip", "clip", r"`language_model` .* is not a causal language model: model_type 'clip'"),
        ("clip", "siglip-vision", r"is not a causal language model"),
    ],
)
def test_refuses_the_wrong_kind_of_component(sources, tmp_path, vision, language, message):
    with pytest.raises(ValueError, match=message):
        convert(str(sources[vision]), str(sources[language]), tmp_path / "out", **MMGEM_OPTIONS)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"image_size": 36}, "36/8 is not a whole number"), ({"image_size": [32, 48]}, "non-square `image_size`")],
)
def test_refuses_non_square_grids(sources, bad_vision, tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        convert(bad_vision(**changes), str(sources["llama"]), tmp_path / "out", **MMGEM_OPTIONS)


def test_refuses_a_non_square_image_processor(sources, tmp_path):
    folder = tmp_path / "siglip"
    shutil.copytree(sources["siglip"], folder)
    transformers.SiglipImageProcessorPil(size={"height": 32, "width": 48}).save_pretrained(folder)
    with pytest.raises(ValueError, match=r"image processor gives \(32, 48\) images"):
        convert(str(folder), str(sources["llama"]), tmp_path / "out", **MMGEM_OPTIONS)


def test_refuses_bad_options_before_loading(sources, pushed, tmp_path):
    args = (str(sources["clip"]), str(sources["llama"]), tmp_path / "out")
    with pytest.raises(ValueError, match="pool_grid_size"):
        convert(*args, pool_grid_size=5)  # the patch grid is 4x4
    with pytest.raises(ValueError, match="dtype"):
        convert(*args, dtype="int8")
    for size in ("lots", 0, None):
        with pytest.raises(ValueError, match="max_shard_size"):
            convert(*args, max_shard_size=size)
    with pytest.raises(ValueError, match="valid repo id"):
        convert(*args, push_to_hub="not a repo")
    with pytest.raises(ValueError, match="apply to a state dict file only"):
        export_checkpoint(pushed["output"], tmp_path / "out", vision_model=str(sources["clip"]))
    with pytest.raises(ValueError, match="holds a 'llama' model, not an MM-GEM"):
        export_checkpoint(sources["llama"], tmp_path / "out")
    with pytest.raises(ValueError, match="regex"):
        export_checkpoint(sources["llama"] / "model.safetensors", tmp_path / "out", key_mapping='{"(": ""}')


def test_existing_output_needs_overwrite(sources, pushed, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not empty; pass overwrite"):
        convert(str(sources["clip"]), str(sources["llama"]), output, **MMGEM_OPTIONS)
    with pytest.raises(ValueError, match="not a model folder"):
        convert(str(sources["clip"]), str(sources["llama"]), output, overwrite=True, **MMGEM_OPTIONS)
    assert (output / "mine.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="would replace the input"):
        convert(str(sources["clip"]), str(sources["llama"]), sources["llama"], overwrite=True, **MMGEM_OPTIONS)


def test_failure_midway_leaves_no_output(sources, pushed, tmp_path, monkeypatch):
    def broken(folder):
        (Path(folder) / "modules.json").write_text("{half")
        raise OSError("disk full")

    monkeypatch.setattr(publish_module, "write_sentence_transformers_files", broken)
    with pytest.raises(OSError, match="disk full"):
        convert(str(sources["clip"]), str(sources["llama"]), tmp_path / "new", **MMGEM_OPTIONS)
    assert not (tmp_path / "new").exists() and _no_partial_left(tmp_path)
    # With --overwrite, a failure keeps the previous output intact.
    previous = tmp_path / "previous"
    shutil.copytree(pushed["output"], previous)
    before = {p.name: p.read_bytes() for p in previous.iterdir() if p.is_file()}
    with pytest.raises(OSError, match="disk full"):
        convert(str(sources["clip"]), str(sources["llama"]), previous, overwrite=True, **MMGEM_OPTIONS)
    assert {p.name: p.read_bytes() for p in previous.iterdir() if p.is_file()} == before
    assert _no_partial_left(tmp_path)


def test_failed_reload_check_leaves_no_output(sources, tmp_path, monkeypatch):
    monkeypatch.setattr(publish_module, "VERIFY_SCRIPT", Path(__file__).with_name("no_such_script.py"))
    with pytest.raises(RuntimeError, match="failed its reload check"):
        convert(str(sources["clip"]), str(sources["llama"]), tmp_path / "out", **MMGEM_OPTIONS)
    assert not (tmp_path / "out").exists() and _no_partial_left(tmp_path)


def test_missing_token_is_refused_before_any_work(sources, hub, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with hub.patch(token=None), pytest.raises(ValueError, match="needs a Hugging Face token.*HF_TOKEN"):
        convert(str(sources["clip"]), str(sources["llama"]), tmp_path / "out", push_to_hub="user/x", **MMGEM_OPTIONS)
    assert not (tmp_path / "out").exists()


def test_rejected_token_is_refused_before_any_work(sources, hub, tmp_path, capsys):
    wrong = "hf_wrong_token_0123456789"
    args = ["--vision-model", str(sources["clip"]), "--language-model", str(sources["llama"]), *CLI_OPTIONS]
    with hub.patch(token=wrong):
        status = main([*args, "--output-dir", str(tmp_path / "out"), "--push-to-hub", "user/x"])
    captured = capsys.readouterr()
    assert status == 1
    assert "rejected the token (HTTP 401)" in captured.err
    assert wrong not in captured.out + captured.err
    assert not (tmp_path / "out").exists()


def test_refused_push(pushed, hub):
    hub.refused_repos.add("user/refused")
    with (
        hub.patch(token=True),
        pytest.raises(HubPushError, match="refused the push to 'user/refused' \\(HTTP 403\\)") as info,
    ):
        push_folder(pushed["output"], "user/refused")
    assert hub.token not in str(info.value)


def test_push_only_after_a_refused_push(pushed, hub, capsys):
    with hub.patch(token=True):
        status = main(["--output-dir", str(pushed["output"]), "--push-to-hub", "user/again", "--push-only"])
    assert status == 0, capsys.readouterr().err[-2000:]
    assert "config.json" in hub.files("user/again")
    assert hub.token not in "".join(capsys.readouterr())


def test_push_replaces_stale_weights_only(pushed, hub, tmp_path):
    earlier = tmp_path / "earlier"
    shutil.copytree(pushed["output"], earlier)
    (earlier / "model.safetensors").rename(earlier / "model-00001-of-00002.safetensors")
    with hub.patch(token=True):
        push_folder(earlier, "user/replaced")
        HfApi().upload_file(path_or_fileobj=b"kept", path_in_repo="notes.md", repo_id="user/replaced")
        push_folder(pushed["output"], "user/replaced")
    files = hub.files("user/replaced")
    assert "model.safetensors" in files and "model-00001-of-00002.safetensors" not in files
    assert files["notes.md"] == b"kept"
    assert len(hub.commits("user/replaced")) == 4  # initial + one commit per push + the notes


def test_unknown_repo(sources, hub, tmp_path):
    with hub.patch(token=True, cache_dir=tmp_path / "cache"):
        with pytest.raises(ValueError, match="`vision_model` 'user/no-such-model' is neither a local model folder nor"):
            convert("user/no-such-model", str(sources["llama"]), tmp_path / "out", **MMGEM_OPTIONS)
        with pytest.raises(ValueError, match="`language_model` 'user/missing-lm' is neither"):
            convert(str(sources["clip"]), "user/missing-lm", tmp_path / "out", **MMGEM_OPTIONS)


def test_cli_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", str(tmp_path / "out"), "--vision-model", "x"])
    assert exit_info.value.code == 2 and "--language-model" in capsys.readouterr().err
    missing = str(tmp_path / "no-such-folder")  # not a Hub id either: refused without any network call
    assert main(["--output-dir", str(tmp_path / "out"), "--vision-model", missing, "--language-model", missing]) == 2
    assert f"`--vision-model` {missing!r} is neither a local model folder nor a model repo" in capsys.readouterr().err


def test_hub_id_of_local_paths(tmp_path):
    snapshot = tmp_path / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert hub_id_of(str(snapshot)) == "openai/clip-vit-large-patch14"
    assert hub_id_of(str(tmp_path)) is None
    assert hub_id_of("TinyLlama/TinyLlama-1.1B-Chat-v1.0") == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
