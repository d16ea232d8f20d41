"""What killed `export-onnx` runs leave and how the next run cleans it; the model card replaced atomically; every
file of an exported folder with the same mode. No ONNX export runs here (tests/test_onnx.py runs them)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from mmgem.conversion.export_onnx import CARD_BEGIN, STAGING_PREFIX, VERIFIED_MARK, clean_leftovers, update_model_card

pytestmark = pytest.mark.fast


def staging(folder, name: str, files: dict[str, bytes], verified: bool):
    path = folder / f"{STAGING_PREFIX}{name}"
    path.mkdir()
    for file, data in files.items():
        (path / file).write_bytes(data)
    if verified:
        (path / VERIFIED_MARK).touch()
    return path


def test_an_unverified_leftover_is_removed_and_the_files_kept(tmp_path):
    (tmp_path / "text_model.onnx").write_bytes(b"old text")
    (tmp_path / "vision_model.onnx").write_bytes(b"old vision")
    staging(tmp_path, "999999999-a", {"text_model.onnx": b"half"}, verified=False)  # killed while exporting
    staging(tmp_path, "k2b3x9", {}, verified=False)  # named by an older mmgem (no process id)
    done = clean_leftovers(tmp_path)
    assert len(done) == 2 and all("removed" in line for line in done)
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))
    assert (tmp_path / "text_model.onnx").read_bytes() == b"old text"


def test_a_kill_between_the_two_moves_is_finished_so_both_files_match(tmp_path):
    (tmp_path / "vision_model.onnx").write_bytes(b"old vision")
    (tmp_path / "text_model.onnx").write_bytes(b"new text")  # moved before the kill
    staging(tmp_path, "999999999-b", {"vision_model.onnx": b"new vision"}, verified=True)
    done = clean_leftovers(tmp_path)
    assert len(done) == 1 and "finished" in done[0]
    assert (tmp_path / "vision_model.onnx").read_bytes() == b"new vision"
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def test_a_running_exports_folder_is_left_alone(tmp_path):
    running = staging(tmp_path, f"{os.getppid()}-c", {"text_model.onnx": b"in progress"}, verified=False)
    assert clean_leftovers(tmp_path) == [] and running.is_dir()


def test_a_rerun_cleans_before_it_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    from mmgem import cli
    from tests.outside import saved_tiny_folder

    folder = saved_tiny_folder(tmp_path / "tiny")
    (folder / "text_model.onnx").write_bytes(b"new text")
    (folder / "vision_model.onnx").write_bytes(b"old vision")
    staging(folder, "999999999-d", {"vision_model.onnx": b"new vision"}, verified=True)
    staging(folder, "999999998-e", {"text_model.onnx": b"junk"}, verified=False)
    monkeypatch.delenv("MMGEM_DEBUG", raising=False)
    assert cli.main(["export-onnx", "--model", str(folder)]) == 2
    out, err = capsys.readouterr()
    assert "finished the export killed" in out and "removed" in out and "--overwrite" in err
    assert (folder / "vision_model.onnx").read_bytes() == b"new vision"
    assert not list(folder.glob(f"{STAGING_PREFIX}*"))


def test_the_card_is_replaced_not_rewritten_in_place(tmp_path):
    card, outside = tmp_path / "README.md", tmp_path / "elsewhere.md"
    outside.write_text("# someone else's file\n")
    card.symlink_to(outside)
    update_model_card(tmp_path, f"{CARD_BEGIN}\nsection\n<!-- onnx-export:end -->\n")
    assert outside.read_text() == "# someone else's file\n"  # not written through the link
    assert not card.is_symlink() and card.read_text().startswith("# someone else's file")
    inode = card.stat().st_ino
    update_model_card(tmp_path, f"{CARD_BEGIN}\nagain\n<!-- onnx-export:end -->\n")
    assert card.stat().st_ino != inode and card.read_text().count(CARD_BEGIN) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".README")]


def test_every_exported_file_gets_the_same_mode(tmp_path):
    from mmgem.build import tiny_mmgem
    from mmgem.conversion.publish import CardInfo, build_model_card, write_folder

    torch.manual_seed(0)
    model, processor = tiny_mmgem()
    write_folder(model, processor, tmp_path, build_model_card(model, CardInfo(), "tiny"), "5GB")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir() if p.is_file()}
    assert "model.safetensors" in modes and len(set(modes.values())) == 1, modes
