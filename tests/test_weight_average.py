"""The moving average of the trained weights (`ema_decay`, `mmgem.training.averaging`): computed as by hand, saved in
checkpoints, put into the final model, and its option checked before any work. Resuming it: `test_train.py`."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from mmgem.training.arguments import parse_arguments
from mmgem.training.averaging import AVERAGE_FILE, ramped_decay
from mmgem.training.train import train

pytestmark = [pytest.mark.fast, pytest.mark.timeout(300)]

FAST = dict(per_device_train_batch_size=4, logging_steps=1, disable_tqdm=True, from_scratch="tiny")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from mmgem.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("data") / "shapes", 12, 2, 2, image_size=32, seed=3, progress=False)


class RecordWeights(TrainerCallback):
    """The trainable weights after every optimizer step (it runs after the average's own update)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def test_the_final_model_is_the_average_computed_by_hand(dataset, tmp_path):
    recorder = RecordWeights()
    decay = 0.5
    result = train(
        data=str(dataset["train"]), output_dir=str(tmp_path), max_steps=4, save_strategy="no", ema_decay=decay,
        callbacks=[recorder], **FAST,
    )  # fmt: skip
    assert len(recorder.steps) == 4
    expected = {name: w.clone() for name, w in recorder.steps[0].items()}
    for update, weights in enumerate(recorder.steps[1:], start=2):
        d = ramped_decay(decay, update)
        for name in expected:
            expected[name] = d * expected[name] + (1 - d) * weights[name]
    assert [ramped_decay(decay, t) for t in (2, 3, 10)] == [3 / 12, 4 / 13, 0.5]
    saved = load_file(str(tmp_path / "model.safetensors"))
    final = dict(result.model.named_parameters())
    moved = 0
    for name, value in expected.items():
        torch.testing.assert_close(final[name].detach(), value, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(saved[name], value, rtol=0, atol=1e-6, msg=name)
        moved += not torch.equal(value, recorder.steps[-1][name])
    assert moved > len(expected) // 2, "the average differs from the last weights"


def test_every_checkpoint_holds_the_average_and_a_run_without_it_holds_none(dataset, tmp_path):
    options = dict(data=str(dataset["train"]), max_steps=4, save_strategy="steps", save_steps=2, **FAST)
    train(output_dir=str(tmp_path / "ema"), ema_decay=0.9, **options)
    for step in (2, 4):
        stored = load_file(str(tmp_path / "ema" / f"checkpoint-{step}" / AVERAGE_FILE))
        assert int(stored.pop("__updates__")) == step
        weights = load_file(str(tmp_path / "ema" / f"checkpoint-{step}" / "model.safetensors"))
        assert set(stored) <= set(weights) and all(stored[k].shape == weights[k].shape for k in stored)
    train(output_dir=str(tmp_path / "plain"), **options)
    assert not list((tmp_path / "plain").rglob(AVERAGE_FILE))


def test_resuming_a_checkpoint_without_an_average_starts_it_from_the_resumed_weights(dataset, tmp_path, caplog):
    options = dict(data=str(dataset["train"]), max_steps=4, save_strategy="steps", save_steps=2, **FAST)
    train(output_dir=str(tmp_path / "plain"), **options)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "plain" / "checkpoint-2", resumed / "checkpoint-2")
    with caplog.at_level(logging.WARNING, logger="mmgem.training.averaging"):
        result = train(output_dir=str(resumed), resume_from_checkpoint="latest", ema_decay=0.9, **options)
    assert "has no weight_average.safetensors" in caplog.text
    assert [row["step"] for row in result.log_history if "loss" in row][-2:] == [3, 4]


@pytest.mark.parametrize("decay", [1.0, 0.0, -0.5, 1.5, float("nan"), True, "0.9"])
def test_a_bad_decay_is_refused_before_work(dataset, tmp_path, decay):
    with pytest.raises(ValueError, match="`ema_decay` must be a number strictly between 0 and 1"):
        train(data=str(dataset["train"]), output_dir=str(tmp_path / "out"), ema_decay=decay, **FAST)
    assert not (tmp_path / "out").exists()


def test_an_average_with_sharded_parameters_is_refused_before_work(dataset, tmp_path):
    with pytest.raises(ValueError, match="`ema_decay` averages whole parameters"):
        train(data=str(dataset["train"]), output_dir=str(tmp_path / "out"), ema_decay=0.9, fsdp="full_shard", **FAST)
    assert not (tmp_path / "out").exists()


def test_the_command_line_takes_the_decay(tmp_path):
    args = parse_arguments(
        ["--from-scratch", "tiny", "--data", ".", "--output-dir", str(tmp_path), "--ema-decay", "0.99"]
    )
    assert args.ema_decay == 0.99
    assert parse_arguments(["--from-scratch", "tiny", "--data", ".", "--output-dir", str(tmp_path)]).ema_decay is None
