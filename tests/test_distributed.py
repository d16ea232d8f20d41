"""Distributed training: 2 CPU processes (gloo, DDP) give the loss and gradients of one process on the whole batch.

The contrastive loss gathers embeddings from every rank with gradients, so each rank's negatives are the global
batch, and both losses are normalised by the global row (token) count; DDP then averages the gradients. Whatever
number of images, regions and caption tokens each rank holds, both must match a single process on the concatenated
batch, false-negative masking across ranks included.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmgem.build import DEFAULT_CORPUS, tiny_mmgem
from modeling_mmgem.modeling_mmgem import MMGEMModel

from .conftest import random_images

WORLD_SIZE = 2
# Gloo binds to the address the hostname resolves to; on a sandboxed machine that address may not be reachable from
# itself, and a rank then waits for its peer until the 30-minute default timeout. Pin the loopback device and fail
# within minutes instead.
LOOPBACK_ENV = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
RENDEZVOUS_TIMEOUT = timedelta(seconds=120)
SPAWN_DEADLINE_S = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    output = model(**batch)
    output.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return output.loss.detach(), grads


def _worker(rank: int, folder: str, port: int, cases: tuple[str, ...]) -> None:
    """One DDP rank: for each case its part of the batch, DDP-averaged gradients and the rank-averaged loss, saved
    by rank 0."""
    # A hung rank prints every thread's stack and exits, so a failure says where it stopped.
    faulthandler.dump_traceback_later(SPAWN_DEADLINE_S - 15, exit=True)
    os.environ.update(LOOPBACK_ENV, MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=RENDEZVOUS_TIMEOUT)
    try:
        for case in cases:
            model = MMGEMModel.from_pretrained(folder).train()
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            batch = torch.load(Path(folder) / f"{case}_rank{rank}.pt")
            output = ddp(**batch)
            output.loss.backward()
            loss = output.loss.detach().clone()
            dist.all_reduce(loss)
            loss /= WORLD_SIZE
            if rank == 0:
                grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
                torch.save({"loss": loss, "grads": grads}, Path(folder) / f"{case}_distributed.pt")
            # Free DDP's reducer while its process group still exists: torn down afterwards (at the function's
            # return) it can hang in gloo.
            del ddp, output
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn_with_deadline(folder: str, cases: tuple[str, ...]) -> None:
    """Run the ranks; a rank error is re-raised, and ranks still running after the deadline are killed (a hang
    fails the test instead of holding the suite)."""
    context = mp.start_processes(_worker, args=(folder, _free_port(), cases), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} gloo ranks did not finish within {SPAWN_DEADLINE_S} s")


# Unequal parts: rank 0 holds 3 images (1 region each), rank 1 holds 5 images (2 regions each). Image 1 (rank 0)
# and image 6 (rank 1) share a caption, images 2 and 5 are the same picture, and region texts repeat within and
# across ranks: the false negatives span ranks. Caption lengths differ, so the caption token counts differ too.
SPLIT = 3
NUM_IMAGES = 8


def _unequal_parts(processor) -> dict[str, list[dict]]:
    images = random_images(NUM_IMAGES, sizes=((32, 32),))
    images[5] = images[2]
    captions = [" ".join(text.split()[: 3 + i % 4]) for i, text in enumerate(DEFAULT_CORPUS[:NUM_IMAGES])]
    captions[6] = captions[1]
    short = sorted({" ".join(text.split()[:4]) for text in DEFAULT_CORPUS})
    boxes = [[[0, 0, 20, 20]] if i < SPLIT else [[0, 0, 20, 20], [10, 10, 30, 30]] for i in range(NUM_IMAGES)]
    region_text = [[short[(i + j) % 3] for j in range(len(b))] for i, b in enumerate(boxes)]
    parts = {"stage1": [], "stage2": []}
    for start, stop in ((0, SPLIT), (SPLIT, NUM_IMAGES), (0, NUM_IMAGES)):  # rank 0, rank 1, the whole batch
        parts["stage1"].append(dict(processor(images=images[start:stop], text=captions[start:stop])))
        parts["stage2"].append(
            dict(
                processor(
                    images=images[start:stop],
                    text=captions[start:stop],
                    boxes=boxes[start:stop],
                    region_text=region_text[start:stop],
                )
            )
        )
    return parts


@pytest.mark.slow
def test_two_gloo_processes_with_unequal_rows_match_one_process_on_the_concatenated_batch(tmp_path):
    torch.manual_seed(0)
    model, processor = tiny_mmgem()
    model.save_pretrained(tmp_path)
    parts = _unequal_parts(processor)
    for case, (rank0, rank1, _) in parts.items():
        torch.save(rank0, tmp_path / f"{case}_rank0.pt")
        torch.save(rank1, tmp_path / f"{case}_rank1.pt")
    rows = [part["text_input_ids"].shape[0] for part in parts["stage2"][:2]]
    assert rows == [3 + 3, 5 + 10]

    _spawn_with_deadline(str(tmp_path), tuple(parts))

    for case, (_, _, whole) in parts.items():
        single = MMGEMModel.from_pretrained(tmp_path).train()
        expected_loss, expected_grads = _loss_and_grads(single, whole)
        unmasked = MMGEMModel.from_pretrained(tmp_path, mask_false_negatives=False).train()(**whole).loss
        assert not torch.allclose(unmasked, expected_loss)  # the batch holds false negatives, across ranks too
        got = torch.load(tmp_path / f"{case}_distributed.pt")
        torch.testing.assert_close(got["loss"], expected_loss, atol=1e-5, rtol=1e-5, msg=case)
        assert set(got["grads"]) == set(expected_grads)
        assert len(expected_grads) > 50  # the vision tower, the LM, the projections and the temperature all learn
        for name, grad in expected_grads.items():
            torch.testing.assert_close(got["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=f"{case}: {name}")


@pytest.mark.slow
@pytest.mark.timeout(SPAWN_DEADLINE_S + 60)
def test_readme_torchrun_command_trains_one_distributed_model_on_cpu(tmp_path):
    """The README's `torchrun --nproc_per_node 2 -m mmgem.cli train ...`, as a user types it on a CPU machine (no
    --use_cpu, no --ddp_backend): one DDP model whose data is split between the ranks, saved once by rank 0."""
    import json
    import shutil
    import subprocess
    import sys

    from mmgem.synthetic import generate_dataset

    paths = generate_dataset(tmp_path / "data", 8, 2, 2, image_size=32, seed=5, progress=False)
    output = tmp_path / "out"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    command = [
        torchrun,
        "--nproc_per_node",
        "2",
        "-m",
        "mmgem.cli",
        "train",
        "--from-scratch",
        "tiny",
        "--data",
        str(paths["train"]),
        "--output-dir",
        str(output),
        "--stage",
        "2",
        "--max-steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
    ]
    # torchrun reads its rendezvous options from PET_* variables: a free loopback port, the command line unchanged.
    env = {
        **os.environ,
        **LOOPBACK_ENV,
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=SPAWN_DEADLINE_S)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in completed.stderr
    assert completed.stdout.count("Saved the trained MM-GEM") == 1  # rank 0 only
    log = json.loads((output / "training_log.json").read_text())
    steps = [row for row in log if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2]
    assert all("loss_contrastive" in row and "loss_caption" in row for row in steps)
    # 8 records, 2 processes x 2 images per device: the ranks read different halves, so 2 steps are one epoch (two
    # independent replicas would log 0.5).
    assert [row["epoch"] for row in steps] == [pytest.approx(0.5), pytest.approx(1.0)]
    assert (output / "model.safetensors").is_file()
    assert not (output / ".mmgem-final.tmp").exists()
    assert sorted(p.name for p in output.iterdir() if p.name.startswith(".")) == []


def test_a_launch_on_a_cpu_machine_gets_gloo_ddp_and_a_non_distributed_launch_is_refused(monkeypatch):
    from types import SimpleNamespace

    from transformers.training_args import ParallelMode

    from mmgem.training import distributed

    monkeypatch.setattr(distributed, "has_accelerator", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = SimpleNamespace(use_cpu=False, ddp_backend=None, deepspeed=None)
    distributed.complete_launch_options(args)
    assert (args.use_cpu, args.ddp_backend) == (True, "gloo")
    # DeepSpeed runs on its own CPU accelerator, which needs use_cpu off, in a gloo group set up beforehand, with
    # torch's Adam: the recipe's config is otherwise kept.
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "vitl14-tinyllama" / "deepspeed_zero2.json"
    groups = []
    monkeypatch.setattr(distributed, "_deepspeed_process_group", groups.append)
    args = SimpleNamespace(use_cpu=False, ddp_backend=None, deepspeed=str(recipe))
    distributed.complete_launch_options(args)
    assert (args.use_cpu, args.ddp_backend, groups) == (False, None, [args])
    written = json.loads(recipe.read_text())
    assert "torch_adam" not in written["optimizer"]["params"]
    written["optimizer"]["params"]["torch_adam"] = True
    assert args.deepspeed == written

    with pytest.raises(ValueError, match=r"launched as 2 processes .*parallel_mode=not_parallel"):
        distributed.check_launch(SimpleNamespace(parallel_mode=ParallelMode.NOT_PARALLEL))
    distributed.check_launch(SimpleNamespace(parallel_mode=ParallelMode.DISTRIBUTED))
    monkeypatch.setenv("WORLD_SIZE", "1")
    args = SimpleNamespace(use_cpu=False, ddp_backend=None, deepspeed=None)
    distributed.complete_launch_options(args)
    distributed.check_launch(SimpleNamespace(parallel_mode=ParallelMode.NOT_PARALLEL))
    assert (args.use_cpu, args.ddp_backend) == (False, None)
