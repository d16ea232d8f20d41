"""The paper-scale recipe (recipes/vitl14-tinyllama): its option files dry-run at tiny size on CPU.

- DDP (the engine that runs on CPU through the Trainer): stage 1 over 2 gloo processes from webdataset shards,
  stage 2 on Visual Genome regions, with the recipe's bf16, activation checkpointing and data options.
- FSDP: the config is what the Trainer reads; accelerate has no FSDP on CPU, so the sharding itself is tried with
  torch's FSDP2 over gloo, the recipe's wrapped layer classes, against the unsharded model.
- DeepSpeed: the JSON parses and every "auto" entry is one the Trainer fills (tests/test_deepspeed.py runs it on 2 CPU
  ranks).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .published_layouts import image_bytes, shape_image, write_shards, write_visual_genome
from .test_distributed import LOOPBACK_ENV, RENDEZVOUS_TIMEOUT, SPAWN_DEADLINE_S, _free_port

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "vitl14-tinyllama"
# Tiny-size overrides of the recipe (given after its files: the command line wins).
TINY = [
    "--from-scratch",
    "tiny",
    "--max-steps",
    "2",
    "--per_device_train_batch_size",
    "2",
    "--dataloader_num_workers",
    "1",
    "--dataloader_prefetch_factor",
    "2",
    "--use_cpu",
    "true",
    "--torch-threads",
    "1",
    "--disable_tqdm",
    "true",
    "--logging_steps",
    "1",
    "--save_strategy",
    "no",
]


def _args_file(name: str) -> list[str]:
    return ["--args_file", str(RECIPE / name)]


def test_recipe_option_files_parse_into_the_training_arguments():
    from mmgem.training.arguments import parse_arguments

    for stage in (1, 2):
        args = parse_arguments(
            [*_args_file(f"stage{stage}.args"), *_args_file("ddp.args"), "--output-dir", "x", "--use_cpu", "true"]
        )
        assert args.stage == stage and args.bf16 and args.data_resampled and args.data_on_error == "skip"
        assert args.activation_checkpointing
    overridden = parse_arguments(
        [*_args_file("stage1.args"), "--per_device_train_batch_size", "3", "--output-dir", "x", "--use_cpu", "true"]
    )
    assert overridden.per_device_train_batch_size == 3  # the command line after the file wins


@pytest.mark.slow
def test_stage1_dry_runs_on_two_gloo_processes_from_webdataset_shards(tmp_path):
    samples = [{"image": image_bytes(shape_image(grey=i)), "caption": f"a white box {i}"} for i in range(16)]
    write_shards(tmp_path / "shards", samples, per_shard=4)
    output = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        LOOPBACK_ENV["MASTER_ADDR"],
        "--master_port",
        str(_free_port()),
        "-m",
        "mmgem.cli",
        "train",
        *_args_file("stage1.args"),
        *_args_file("ddp.args"),
        *TINY,
        "--data",
        f"{tmp_path}/shards/{{00000..00003}}.tar",
        "--output-dir",
        str(output),
        "--ddp_backend",
        "gloo",
        "--ddp_timeout",
        str(int(RENDEZVOUS_TIMEOUT.total_seconds())),
    ]
    env = {**os.environ, **LOOPBACK_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=SPAWN_DEADLINE_S, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    log = json.loads((output / "training_log.json").read_text())
    assert [row["step"] for row in log if "loss" in row] == [1, 2]
    assert (output / "model.safetensors").is_file()


def test_stage2_dry_runs_on_visual_genome_regions(tmp_path):
    from mmgem.training.train import main

    entries = [
        (i, shape_image(), [([8, 4, 40, 30], "a white rectangle"), ([20, 10, 30, 20], f"part {i}")]) for i in range(4)
    ]
    path = write_visual_genome(tmp_path / "vg", entries)
    argv = [
        *_args_file("stage2.args"),
        *_args_file("ddp.args"),
        *TINY,
        "--data",
        str(path),
        "--output-dir",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    assert log[0]["loss_contrastive"] > 0 and (tmp_path / "out" / "model.safetensors").is_file()


def test_fsdp_config_is_read_by_the_trainer_and_names_the_model_layers():
    from transformers import TrainingArguments

    from mmgem.build import tiny_mmgem

    args = TrainingArguments(output_dir="x", fsdp=True, fsdp_config=str(RECIPE / "fsdp.json"))
    config = args.fsdp_config
    assert config["version"] == 2 and config["activation_checkpointing"] and config["reshard_after_forward"]
    model, _ = tiny_mmgem()
    layer_classes = {type(m).__name__ for m in model.modules()}
    assert set(config["transformer_layer_cls_to_wrap"]) <= layer_classes  # same classes as ViT-L/14 and TinyLlama
    assert (RECIPE / "fsdp.args").read_text().split() == [
        "--fsdp",
        "--fsdp_config",
        "recipes/vitl14-tinyllama/fsdp.json",
    ]


def _fsdp2_rank(rank: int, port: int, out: str) -> None:
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mmgem.build import tiny_mmgem

    os.environ.update(LOOPBACK_ENV, MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=RENDEZVOUS_TIMEOUT)
    try:
        torch.manual_seed(0)
        model, processor = tiny_mmgem()
        reference = copy.deepcopy(model)
        batch = processor(images=[shape_image(), shape_image(grey=40)], text=["a white box", "a grey box"])
        expected = reference(**batch).loss
        expected.backward()
        mesh = init_device_mesh("cpu", (2,))
        wrap = json.loads((RECIPE / "fsdp.json").read_text())["transformer_layer_cls_to_wrap"]
        wrapped = [type(m).__name__ for m in model.modules() if type(m).__name__ in wrap]
        for module in model.modules():
            if type(module).__name__ in wrap:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        loss = model(**batch).loss
        loss.backward()
        # Every rank ran the same batch: the sharded model's loss and gradients are the unsharded one's.
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        worst = max(float((grads[n] - p.grad).abs().max()) for n, p in reference.named_parameters())
        scale = max(float(p.grad.abs().max()) for p in reference.parameters())
        if rank == 0:
            Path(out).write_text(
                json.dumps(
                    {
                        "loss": float(loss),
                        "expected": float(expected),
                        "worst_grad_diff": worst,
                        "grad_scale": scale,
                        "wrapped": len(wrapped),
                        "sharded": sum(hasattr(p, "full_tensor") for p in model.parameters()),
                        "parameters": len(list(model.parameters())),
                    }
                )
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_shards_the_model_over_gloo(tmp_path):
    """The recipe's FSDP wrapping (its `transformer_layer_cls_to_wrap`) with torch's FSDP2 over 2 gloo ranks: every
    parameter sharded (the temperature too, shape (1,)), loss and gradients those of the unsharded model."""
    import torch.multiprocessing as mp

    out = tmp_path / "fsdp.json"
    mp.start_processes(_fsdp2_rank, args=(_free_port(), str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    assert result["wrapped"] >= 4  # the vision and language layers of the tiny model
    assert result["sharded"] == result["parameters"]
    assert abs(result["loss"] - result["expected"]) < 1e-5, result
    # float32 sums in another order (the reduce-scatter): within 1e-5 of the largest gradient
    assert result["worst_grad_diff"] < 1e-5 * max(1.0, result["grad_scale"]), result


def test_deepspeed_zero2_config_matches_the_trainer_arguments():
    config = json.loads((RECIPE / "deepspeed_zero2.json").read_text())
    assert config["zero_optimization"]["stage"] == 2

    def auto_keys(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from auto_keys(value, f"{prefix}{key}.")
            elif value == "auto":
                yield f"{prefix}{key}"

    import transformers.integrations.deepspeed as integration

    source = Path(integration.__file__).read_text()
    filled = set(re.findall(r'fill_(?:match|only)\(\s*"([\w.]+)"', source))
    assert set(auto_keys(config)) <= filled, set(auto_keys(config)) - filled
    assert "scheduler" not in config  # the Trainer's cosine schedule (stage*.args) applies
    assert (RECIPE / "deepspeed.args").read_text().split()[:2] == [
        "--deepspeed",
        "recipes/vitl14-tinyllama/deepspeed_zero2.json",
    ]


def test_run_script_is_valid_bash_and_uses_the_recipe_files():
    script = (RECIPE / "run.sh").read_text()
    assert subprocess.run(["bash", "-n", str(RECIPE / "run.sh")]).returncode == 0
    for name in ("stage1.args", "stage2.args", "$ENGINE.args"):
        assert f"$RECIPE/{name}" in script
