"""Training: stage 1 then stage 2 through the Python API and the `mmgem train` command, resuming, LoRA, freezing,
bad records, imagefolder data; the output folder loads with AutoModel (remote code)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

from mmgem.cli import main as cli_main
from mmgem.training.arguments import MODEL_PRESETS
from mmgem.training.train import train

pytestmark = pytest.mark.fast

FAST = dict(per_device_train_batch_size=4, logging_steps=1, save_strategy="no", disable_tqdm=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from mmgem.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("data") / "shapes", 12, 2, 2, image_size=32, seed=3, progress=False)


@pytest.fixture(scope="module")
def stage1(dataset, tmp_path_factory):
    """A tiny model trained 3 steps from scratch on stage 1."""
    output = tmp_path_factory.mktemp("stage1")
    result = train(from_scratch="tiny", data=str(dataset["train"]), output_dir=str(output), max_steps=3, **FAST)
    return output, result


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_collator_stages_region_sampling_and_repeated_texts():
    from PIL import Image

    from mmgem.build import tiny_mmgem
    from mmgem.data.collator import MMGEMCollator

    _, processor = tiny_mmgem()
    image = Image.new("RGB", (32, 32), "white")
    regions = [{"box": [0, 0, 8, 8], "caption": f"a {c} circle"} for c in ("red", "blue", "green")]
    items = [
        {"image": image, "caption": "a red circle and more", "regions": regions},
        {"image": image, "caption": "a blue circle", "regions": regions[:1]},
    ]
    stage1 = MMGEMCollator(processor, stage=1)(items)
    assert "boxes" not in stage1 and stage1["text_input_ids"].shape[0] == 2
    # "a blue circle" is image 1's caption and "a red circle" repeats: regions red (image 0) and green stay.
    stage2 = MMGEMCollator(processor, stage=2)(items)
    assert [len(b) for b in stage2["boxes"]] == [2, 0]
    assert stage2["text_input_ids"].shape[0] == stage2["input_ids"].shape[0] == 4
    kept_all = MMGEMCollator(processor, stage=2, unique_region_texts=False)(items)
    assert [len(b) for b in kept_all["boxes"]] == [3, 1]
    capped = MMGEMCollator(processor, stage=2, max_regions_per_image=1, unique_region_texts=False, seed=0)(items)
    assert [len(b) for b in capped["boxes"]] == [1, 1]
    with pytest.raises(ValueError, match="stage"):
        MMGEMCollator(processor, stage=3)


def test_collator_leaves_out_regions_the_center_crop_removes():
    """A wide image's box in the part the center crop cuts away would fail the batch: it is left out instead."""
    from PIL import Image

    from mmgem.build import tiny_mmgem
    from mmgem.data.collator import MMGEMCollator

    _, processor = tiny_mmgem()  # 32 px: a 96x32 image is resized to 96x32, then cropped to x in [32, 64)
    image = Image.new("RGB", (96, 32), "white")
    regions = [
        {"box": [0, 0, 20, 20], "caption": "a red circle"},  # wholly left of the crop
        {"box": [40, 4, 56, 20], "caption": "a blue star"},  # inside
        {"box": [20, 0, 40, 10], "caption": "a green cross"},  # cut by the crop: clipped, kept
    ]
    batch = MMGEMCollator(processor, stage=2)([{"image": image, "caption": "shapes", "regions": regions}])
    assert len(batch["boxes"][0]) == 2
    expected = processor(
        images=[image],
        text=["shapes"],
        boxes=[[r["box"] for r in regions[1:]]],
        region_text=[["a blue star", "a green cross"]],
    )
    torch.testing.assert_close(batch["boxes"][0], expected["boxes"][0])


def test_collator_text_keys_follow_the_evaluation_normalisation():
    from PIL import Image

    from mmgem.build import tiny_mmgem
    from mmgem.data.collator import MMGEMCollator

    _, processor = tiny_mmgem()
    image = Image.new("RGB", (32, 32), "white")
    items = [
        {"image": image, "caption": "A red circle.", "regions": [{"box": [0, 0, 8, 8], "caption": "a blue star"}]},
        {"image": image, "caption": "a  red circle", "regions": []},
        {"image": image, "caption": "a red square", "regions": []},
    ]
    keys = MMGEMCollator(processor, stage=2)(items)["text_keys"].tolist()  # images first, then the region
    assert len(keys) == 4 and keys[0] == keys[1] and len(set(keys)) == 3


def _region_draws(collator, items, batches):
    return [tuple(tuple(map(tuple, b.tolist())) for b in collator(items)["boxes"]) for _ in range(batches)]


def test_collator_random_stream_per_rank_and_worker_and_continued_on_resume(monkeypatch):
    from types import SimpleNamespace

    from PIL import Image

    from mmgem.build import tiny_mmgem
    from mmgem.data import collator as collator_module
    from mmgem.data.collator import MMGEMCollator, MMGEMCollatorCallback

    _, processor = tiny_mmgem()
    image = Image.new("RGB", (32, 32), "white")
    regions = [{"box": [i, i, i + 8, i + 8], "caption": f"region {i}"} for i in range(10)]
    items = [{"image": image, "caption": "a picture", "regions": regions}]

    def collator(rank=0):
        return MMGEMCollator(processor, stage=2, max_regions_per_image=3, seed=1, rank=rank)

    stream = _region_draws(collator(), items, 6)
    assert len(set(stream)) == 6  # each batch draws anew
    assert _region_draws(collator(), items, 6) == stream  # seeded: reproducible
    assert not set(_region_draws(collator(rank=1), items, 6)) & set(stream)  # ranks do not share draws
    # A run resumed after 4 batches continues the stream (the callback sets rank and position at the epoch start).
    resumed = collator()
    state = SimpleNamespace(global_step=2)
    MMGEMCollatorCallback(resumed).on_epoch_begin(
        SimpleNamespace(gradient_accumulation_steps=2, process_index=0), state, None
    )
    assert _region_draws(resumed, items, 2) == stream[4:]
    # Two DataLoader workers take batches in turn: worker 1's first batch is batch 1 of the stream.
    monkeypatch.setattr(
        collator_module.torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=1, num_workers=2)
    )
    assert _region_draws(collator(), items, 2) == [stream[1], stream[3]]


def test_stage1_from_scratch_logs_both_losses_and_writes_a_model_folder(stage1):
    output, result = stage1
    steps = [row for row in result.log_history if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3]
    for row in steps:
        assert row["loss"] == pytest.approx(row["loss_contrastive"] + row["loss_caption"], rel=1e-5)
        assert row["logit_scale"] > 1
    assert json.loads((output / "training_log.json").read_text()) == result.log_history
    for name in (
        "config.json",
        "model.safetensors",
        "modeling_mmgem.py",
        "processor_config.json",
        "tokenizer.json",
        "modules.json",
    ):
        assert (output / name).is_file(), name
    assert not (output / ".mmgem-final.tmp").exists()
    loaded = AutoModel.from_pretrained(output, trust_remote_code=True)
    assert type(loaded).__name__ == "MMGEMModel"
    assert loaded.config.text_config.hidden_size == MODEL_PRESETS["tiny"]["text_config"]["hidden_size"]


def test_stage2_adds_regions_and_changes_the_weights(stage1, dataset, tmp_path):
    folder, _ = stage1
    result = train(
        model=str(folder),
        data=str(dataset["train"]),
        output_dir=str(tmp_path),
        stage=2,
        max_steps=2,
        max_regions_per_image=2,
        **FAST,
    )
    assert all("loss_contrastive" in row for row in result.log_history if "loss" in row)
    before, after = _weights(folder), _weights(tmp_path)
    assert set(before) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    AutoModel.from_pretrained(tmp_path, trust_remote_code=True)


def test_train_command_line(dataset, tmp_path, capsys):
    threads = torch.get_num_threads()
    status = cli_main(
        [
            "train",
            "--from-scratch",
            "tiny",
            "--data",
            str(dataset["train"]),
            "--output-dir",
            str(tmp_path),
            "--max-steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--save_strategy",
            "no",
            "--torch-threads",
            "1",
            "--disable_tqdm",
            "true",
        ]
    )
    assert torch.get_num_threads() == 1
    torch.set_num_threads(threads)
    assert status == 0
    assert "Saved the trained MM-GEM" in capsys.readouterr().out
    log = json.loads((tmp_path / "training_log.json").read_text())
    assert max(row["step"] for row in log) == 2
    assert (tmp_path / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("stage", "extra"),
    [(1, {}), (2, {}), (1, {"hard_negative_field": "colour_group"}), (1, {"ema_decay": 0.9})],
)
def test_resume_from_checkpoint_reaches_the_uninterrupted_result(dataset, tmp_path, stage, extra):
    # Stage 2 draws regions at random: the resumed run must continue the draws, not replay them from the start.
    # Hard-negative batches: the resumed run must see the interrupted run's order (12 images: epoch 2 from step 4).
    # A weight average: the resumed run must continue the average stored in the checkpoint.
    options = dict(
        from_scratch="tiny",
        data=str(dataset["train"]),
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        stage=stage,
        max_regions_per_image=1 if stage == 2 else None,
        **extra,
        **{k: v for k, v in FAST.items() if k != "save_strategy"},
    )
    train(output_dir=str(tmp_path / "full"), **options)
    # A run that died after step 2: only checkpoint-2 survives.
    interrupted = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoint-2", interrupted / "checkpoint-2")
    result = train(output_dir=str(interrupted), resume_from_checkpoint="latest", **options)
    assert [row["step"] for row in result.log_history if "loss" in row][-2:] == [3, 4]
    full, resumed = _weights(tmp_path / "full"), _weights(interrupted)
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], msg=key)


def test_lora_saves_a_merged_model_and_the_adapter(stage1, dataset, tmp_path, monkeypatch):
    folder, _ = stage1
    # `--model runs/stage1` as typed in a shell: relative to the working directory of the training run.
    monkeypatch.chdir(folder.parent)
    train(
        model=folder.name,
        data=str(dataset["train"]),
        output_dir=str(tmp_path),
        max_steps=2,
        lora=True,
        lora_r=4,
        learning_rate=1e-2,
        **FAST,
    )
    adapter_config = json.loads((tmp_path / "lora_adapter" / "adapter_config.json").read_text())
    # The adapter names its base by absolute path: it loads from any directory, not only where it was trained.
    assert adapter_config["base_model_name_or_path"] == str(folder.resolve())
    before, after = _weights(folder), _weights(tmp_path)
    assert set(before) == set(after)  # merged: a plain MM-GEM again, no LoRA keys
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("language_model.model.layers") for k in changed)  # LoRA merged into the LM
    assert not any(k.startswith("vision_model") for k in changed)  # vision tower frozen by default
    merged = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    # The adapter alone loads through PEFT's Auto class where mmgem is not installed, and gives the merged model.
    from .test_lora import auto_peft_outside

    processor = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    with torch.no_grad():
        expected = merged.get_text_features(**processor(text=["a red circle", "two blue squares"])).pooler_output
    auto_peft_outside(tmp_path / "lora_adapter", folder, expected, tmp_path)


def test_freezing_keeps_the_frozen_parts(stage1, dataset, tmp_path):
    folder, _ = stage1
    train(
        model=str(folder),
        data=str(dataset["train"]),
        output_dir=str(tmp_path),
        max_steps=2,
        freeze_vision=True,
        freeze_projections=True,
        learning_rate=1e-2,
        **FAST,
    )
    before, after = _weights(folder), _weights(tmp_path)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("language_model.") for k in changed)


def test_bad_records_fail_with_their_line_or_are_skipped(dataset, tmp_path):
    lines = dataset["train"].read_text().splitlines()
    bad = json.loads(lines[1])
    bad["regions"][0]["box"] = [0, 0, 500, 500]  # outside the 32 x 32 image
    data = dataset["train"].parent / "with_bad_record.jsonl"
    data.write_text("\n".join([lines[0], json.dumps(bad)] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        train(from_scratch="tiny", data=str(data), output_dir=str(tmp_path / "fail"), max_steps=1, **FAST)
    with pytest.warns(UserWarning, match="skipped 1"):
        train(
            from_scratch="tiny",
            data=str(data),
            output_dir=str(tmp_path / "skip"),
            max_steps=1,
            data_on_error="skip",
            **FAST,
        )
    assert (tmp_path / "skip" / "model.safetensors").is_file()


def test_imagefolder_data(dataset, tmp_path):
    from mmgem.data.records import export_imagefolder, load_jsonl_records

    export_imagefolder(load_jsonl_records(dataset["train"]), tmp_path / "folder")
    train(
        from_scratch="tiny",
        data=str(tmp_path / "folder"),
        output_dir=str(tmp_path / "out"),
        stage=2,
        max_steps=1,
        **FAST,
    )
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(model="x", from_scratch="tiny"), "exactly one of `model`"),
        (dict(from_scratch="huge"), "`from_scratch`"),
        (dict(from_scratch="tiny", stage=3), "`stage`"),
        (dict(from_scratch="tiny", data_on_error="ignore"), "`data_on_error`"),
        (dict(from_scratch="tiny", lora=True, freeze_vision=True), "`freeze_"),
        (dict(from_scratch="tiny", data="missing.jsonl"), "`data` does not exist"),
        (dict(from_scratch="tiny", resume_from_checkpoint="latest"), "no checkpoint"),
        (dict(from_scratch="tiny", not_an_option=1), "Unknown training options"),
        (dict(from_scratch="tiny", stage=2, max_regions_per_image=-1), "`max_regions_per_image` must be a positive"),
        (dict(from_scratch="tiny", image_cache_mb=-1.0), "`image_cache_mb` must be a number of megabytes >= 0"),
        (dict(from_scratch="tiny", image_cache_mb=float("nan")), "`image_cache_mb` must be a number of megabytes"),
        (dict(from_scratch="tiny", output_dir=None), "`output_dir` is required"),
    ],
)
def test_arguments_are_checked_before_work(dataset, tmp_path, options, message):
    options = {"data": str(dataset["train"]), "output_dir": str(tmp_path / "out"), **options}
    with pytest.raises(ValueError, match=message):
        train(**options)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert not Path("trainer_output").exists()  # TrainingArguments' stand-in for a missing output_dir


def test_stage2_needs_regions(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), "white").save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.png", "caption": "white"}) + "\n")
    with pytest.raises(ValueError, match="regions"):
        train(from_scratch="tiny", data=str(tmp_path / "d.jsonl"), output_dir=str(tmp_path / "o"), stage=2, **FAST)


def test_vision_learning_rate_multiplier_gives_the_tower_its_own_rate(tmp_path):
    from mmgem.build import tiny_mmgem
    from mmgem.training.arguments import make_arguments
    from mmgem.training.trainer import MMGEMTrainer

    model, _ = tiny_mmgem()
    args = make_arguments(
        output_dir=str(tmp_path),
        from_scratch="tiny",
        data=str(tmp_path),
        learning_rate=1e-3,
        vision_learning_rate_multiplier=3.0,
        use_cpu=True,
    )
    optimizer = MMGEMTrainer(model=model, args=args).create_optimizer()
    vision = {id(p) for p in model.vision_model.parameters()}
    rates = {(id(p) in vision, round(group["lr"], 9)) for group in optimizer.param_groups for p in group["params"]}
    assert rates == {(False, 1e-3), (True, 3e-3)}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
