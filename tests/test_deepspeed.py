"""DeepSpeed ZeRO through `mmgem train --deepspeed` on 2 CPU processes (DeepSpeed's CPU accelerator, gloo).

The recipe's own ZeRO-2 config is run: the losses and the updated weights equal one process training on the
concatenated batch, a checkpoint resumes to the same weights, and `mmgem-convert` exports it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmgem.build import tiny_mmgem
from mmgem.synthetic import generate_dataset

from .test_distributed import LOOPBACK_ENV, SPAWN_DEADLINE_S, _free_port

pytest.importorskip("deepspeed", reason="DeepSpeed is the `deepspeed` extra (make venv installs it)")

ROOT = Path(__file__).resolve().parents[1]
ZERO2 = ROOT / "recipes" / "vitl14-tinyllama" / "deepspeed_zero2.json"
# Stage 1 (no region sampling), no schedule or warm-up: the two runs must see the same data and learning rate.
STEPS = 2
LEARNING_RATE = 1e-3
COMMON = [
    "--stage",
    "1",
    "--learning_rate",
    str(LEARNING_RATE),
    "--lr_scheduler_type",
    "constant",
    "--warmup_steps",
    "0",
    "--logging_steps",
    "1",
    "--seed",
    "0",
    "--disable_tqdm",
    "true",
    "--report_to",
    "none",
]


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {
        **os.environ,
        **LOOPBACK_ENV,
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [str(torchrun), "--nproc_per_node", "2", "-m", "mmgem.cli", "train", *args]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=SPAWN_DEADLINE_S)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    return completed


def _losses(folder: Path) -> list[float]:
    log = json.loads((folder / "training_log.json").read_text())
    return [row["loss"] for row in log if "loss" in row]


# Attention is invariant to the key bias (it adds one constant to every logit of a query), so its true gradient is
# zero and what Adam sees is rounding noise, normalised to steps of up to the learning rate: bounded, not compared.
ZERO_GRADIENT = "self_attn.k_proj.bias"


def _assert_same_weights(got: dict, expected: dict, atol: float) -> None:
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        tolerance = 2 * LEARNING_RATE * STEPS if name.endswith(ZERO_GRADIENT) else atol
        torch.testing.assert_close(got[name], tensor, atol=tolerance, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A saved tiny model, 8 records, and one process training on 4 images per step (the runs to match)."""
    root = tmp_path_factory.mktemp("deepspeed")
    torch.manual_seed(0)
    model, processor = tiny_mmgem()
    start = root / "start"
    model.save_pretrained(start)
    processor.save_pretrained(start)
    paths = generate_dataset(root / "data", 8, 2, 2, image_size=32, seed=5, progress=False)
    data = ["--model", str(start), "--data", str(paths["train"]), *COMMON]
    from mmgem.training.train import main as train_main

    single = root / "single"
    train_main(
        [
            *data,
            "--output-dir",
            str(single),
            "--max_steps",
            str(STEPS),
            "--per_device_train_batch_size",
            "4",
            "--save_strategy",
            "no",
        ]
    )
    return {"start": start, "data": data, "single": single}


@pytest.mark.slow
@pytest.mark.timeout(3 * SPAWN_DEADLINE_S)
def test_zero2_on_two_cpu_ranks_matches_one_process_resumes_and_exports(reference, tmp_path):
    start, data, single = reference["start"], reference["data"], reference["single"]

    # Two DeepSpeed ranks (ZeRO-2, the recipe's config), 2 images each per step; a checkpoint every step.
    zero = tmp_path / "zero2"
    zero_args = [
        "--output-dir",
        str(zero),
        "--max_steps",
        str(STEPS),
        "--per_device_train_batch_size",
        "2",
        "--save_steps",
        "1",
        "--deepspeed",
        str(ZERO2),
    ]
    completed = _torchrun([*data, *zero_args])
    assert completed.stdout.count("Saved the trained MM-GEM") == 1
    torch.testing.assert_close(_losses(zero), _losses(single), atol=1e-5, rtol=1e-5)
    log = json.loads((zero / "training_log.json").read_text())
    assert [row["epoch"] for row in log if "loss" in row] == [pytest.approx(0.5), pytest.approx(1.0)]
    expected = load_file(single / "model.safetensors")
    _assert_same_weights(load_file(zero / "model.safetensors"), expected, atol=1e-5)
    assert not torch.equal(
        load_file(zero / "model.safetensors")["logit_scale.log_value"],
        load_file(start / "model.safetensors")["logit_scale.log_value"],
    )
    # The ZeRO state of each checkpoint: optimizer partitions per rank.
    assert sorted(p.name for p in (zero / "checkpoint-1" / "global_step1").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]

    # Resume from checkpoint-1: the second step gives the uninterrupted run's weights.
    resumed = tmp_path / "resumed"
    _torchrun(
        [
            *data,
            "--output-dir",
            str(resumed),
            "--max_steps",
            str(STEPS),
            "--per_device_train_batch_size",
            "2",
            "--save_strategy",
            "no",
            "--deepspeed",
            str(ZERO2),
            "--resume_from_checkpoint",
            str(zero / "checkpoint-1"),
        ]
    )
    _assert_same_weights(load_file(resumed / "model.safetensors"), load_file(zero / "model.safetensors"), 1e-6)

    # The last checkpoint exports to a Hub folder with the final weights.
    from mmgem.conversion.convert_mmgem import main as convert_main

    exported = tmp_path / "exported"
    assert convert_main(["--from-checkpoint", str(zero / f"checkpoint-{STEPS}"), "--output-dir", str(exported)]) in (
        0,
        None,
    )
    from modeling_mmgem.modeling_mmgem import MMGEMModel

    reloaded = MMGEMModel.from_pretrained(exported).state_dict()
    _assert_same_weights({k: reloaded[k] for k in expected}, load_file(zero / "model.safetensors"), 0.0)


@pytest.mark.slow
@pytest.mark.timeout(2 * SPAWN_DEADLINE_S)
def test_zero3_on_two_cpu_ranks_matches_one_process(reference, tmp_path):
    """ZeRO-3 (parameters partitioned too) runs on CPU: the recipe's config at stage 3, the full weights gathered
    into the saved model."""
    config = json.loads(ZERO2.read_text())
    config["zero_optimization"] = {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    zero = tmp_path / "zero3"
    _torchrun(
        [
            *reference["data"],
            "--output-dir",
            str(zero),
            "--max_steps",
            str(STEPS),
            "--per_device_train_batch_size",
            "2",
            "--save_strategy",
            "no",
            "--deepspeed",
            str(tmp_path / "zero3.json"),
        ]
    )
    torch.testing.assert_close(_losses(zero), _losses(reference["single"]), atol=1e-5, rtol=1e-5)
    # The gathered ZeRO-3 weights are saved under the modules' own names; loading maps them as for any checkpoint.
    from modeling_mmgem.modeling_mmgem import MMGEMModel

    loaded = MMGEMModel.from_pretrained(zero).state_dict()
    expected = load_file(reference["single"] / "model.safetensors")
    _assert_same_weights({name: loaded[name] for name in expected}, expected, atol=1e-5)
