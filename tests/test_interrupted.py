"""Interrupted runs and publishing hygiene: resume skips checkpoints killed while being written, killed conversions
leave nothing behind for long (their reload-check child dies with them), no secret lands in a file, a push carries
only the export's files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmgem.build import tiny_mmgem
from mmgem.conversion import publish
from mmgem.training.checkpoints import last_complete_checkpoint, resolve_checkpoint
from mmgem.training.train import train

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[1]
SECRET = "hf_iAmASecretTokenThatMustNotLeak"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from mmgem.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("data") / "shapes", 8, 2, 2, image_size=32, seed=5, progress=False)


def fake_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    if complete:
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return checkpoint


# ---------------------------------------------------------------------------------------------- 8. resume
def test_latest_skips_checkpoints_killed_while_written(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 12, complete=False)  # killed before trainer_state.json
    truncated = fake_checkpoint(tmp_path, 11)
    (truncated / "trainer_state.json").write_text('{"global_st')  # killed while writing it
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")


def test_explicit_incomplete_checkpoint_is_refused(tmp_path):
    from mmgem.training.arguments import make_arguments

    checkpoint = fake_checkpoint(tmp_path, 3, complete=False)
    args = make_arguments(
        from_scratch="tiny", data=".", output_dir=str(tmp_path), resume_from_checkpoint=str(checkpoint)
    )
    with pytest.raises(ValueError, match="incomplete: no readable trainer_state.json"):
        resolve_checkpoint(args)
    args = make_arguments(from_scratch="tiny", data=".", output_dir=str(tmp_path), resume_from_checkpoint="latest")
    with pytest.raises(ValueError, match="no checkpoint-.* is complete"):
        resolve_checkpoint(args)


def test_resume_after_a_kill_during_a_save_and_no_token_in_any_file(dataset, tmp_path):
    options = dict(
        from_scratch="tiny",
        data=str(dataset["train"]),
        per_device_train_batch_size=4,
        logging_steps=1,
        disable_tqdm=True,
        save_strategy="steps",
        save_steps=1,
        max_steps=2,
        hub_token=SECRET,
    )
    output = tmp_path / "run"
    train(output_dir=str(output), **options)
    # The run is killed while checkpoint-2 is written: its trainer_state.json (written last) is cut short.
    state = output / "checkpoint-2" / "trainer_state.json"
    state.write_text(state.read_text()[:40])
    result = train(output_dir=str(output), resume_from_checkpoint="latest", **options)
    assert result.log_history[-1]["step"] == 2
    for path in output.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"the hub token was written to {path}"
    args = torch.load(output / "checkpoint-1" / "training_args.bin", weights_only=False)
    assert args.hub_token is None and args.max_steps == 2


# ---------------------------------------------------------------------------------------------- 8. conversion
def test_next_conversion_removes_what_killed_ones_left(tmp_path):
    output = tmp_path / "model"
    output.mkdir()
    (output / "config.json").write_text("{}")
    dead = 2**22 + 12345  # above the default pid_max: no such process
    left = [
        tmp_path / f".model.partial-{dead}-abc",
        tmp_path / f".model.old-{dead}-1234abcd",
        tmp_path / ".model.partial-x",
    ]
    for folder in left:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"0" * 1000)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = tmp_path / f".model.partial-{running.pid}-def"  # a conversion running now: kept
        alive.mkdir()
        other = tmp_path / ".othermodel.partial-1-abc"  # another output's: kept
        other.mkdir()
        with publish.staging_folder(output, overwrite=True) as staging:
            (staging / "config.json").write_text('{"new": 1}')
        assert not any(folder.exists() for folder in left)
        assert alive.is_dir() and other.is_dir()
        assert json.loads((output / "config.json").read_text()) == {"new": 1}
    finally:
        running.kill()
        running.wait()


def test_a_kill_between_the_two_renames_restores_the_previous_output(tmp_path):
    output = tmp_path / "model"
    old = tmp_path / ".model.old-4194999-00000000"  # the previous output, moved aside; the new one never arrived
    old.mkdir()
    (old / "config.json").write_text('{"previous": 1}')
    assert publish.clean_leftovers(output) == [old]
    assert json.loads((output / "config.json").read_text()) == {"previous": 1}


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child processes from /proc (Linux)")
def test_reload_check_child_dies_with_a_killed_conversion(tmp_path):
    # The parent runs the real reload check; its references file is a FIFO, so the child blocks reading it for
    # as long as nobody writes: only the parent's death can end it.
    parent_code = (
        "import os, sys; from pathlib import Path; import mmgem.conversion.publish as p\n"
        "p.torch.save = lambda obj, path: os.mkfifo(path)\n"
        f"p.verify_in_subprocess(Path({str(tmp_path)!r}), {{}})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=REPO, env=env)
    child = None
    try:
        deadline = time.monotonic() + 120
        while child is None and time.monotonic() < deadline and parent.poll() is None:
            children = _children(parent.pid)
            child = children[0] if children else None
            time.sleep(0.1)
        assert child is not None, "the reload check never started"
        time.sleep(0.5)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
            if Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0] == "Z":
                break  # exited (a zombie until init reaps it)
            time.sleep(0.1)
        stat = Path(f"/proc/{child}/stat")
        assert not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z", "the child outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None and Path(f"/proc/{child}").exists():
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------------------------------------- 9. publishing
def test_push_carries_only_the_export_files(fake_hub, tmp_path):
    model, processor = tiny_mmgem()
    folder = tmp_path / "export"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "README.md").write_text("# tiny\n")
    exported = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"secret": SECRET}))
    (folder / "linked.json").symlink_to(outside)
    (folder / ".env").write_text(f"HF_TOKEN={SECRET}\n")
    (folder / "notes.md").write_text("private notes")
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("[core]\n")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "modeling_mmgem.cpython-311.pyc").write_bytes(b"\0")
    with fake_hub.patch(token=True):
        publish.push_folder(folder, "user/clean")
    files = fake_hub.files("user/clean")
    assert sorted(name for name in files if name != ".gitattributes") == exported
    assert not any(SECRET.encode() in content for content in files.values())
