"""`mmgem export-onnx`: text_model.onnx and vision_model.onnx, run by onnxruntime where mmgem is not installed,
equal get_text_features / get_image_features on batches of mixed lengths padded on either side."""

from __future__ import annotations

import pytest

from .outside import run_cli, run_outside, saved_tiny_folder

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow  # two ONNX exports (about 40 s of CPU)


@pytest.fixture(scope="module")
def onnx_folder(tmp_path_factory):
    folder = saved_tiny_folder(tmp_path_factory.mktemp("onnx") / "tiny-mmgem")
    result = run_cli("export-onnx", "--model", str(folder), cwd=folder.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    return folder


def test_export_writes_both_files_and_lists_them_in_the_card(onnx_folder):
    assert (onnx_folder / "text_model.onnx").is_file() and (onnx_folder / "vision_model.onnx").is_file()
    card = (onnx_folder / "README.md").read_text()
    assert "`text_model.onnx`" in card and "`vision_model.onnx`" in card
    assert not list(onnx_folder.glob(".onnx-export-*")), "staging left behind"


def test_onnxruntime_equals_pytorch_without_the_project(onnx_folder):
    run_outside(
        f"""
        import numpy as np, onnxruntime, torch
        from transformers import AutoModel, AutoProcessor
        folder = {str(onnx_folder)!r}
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        text = onnxruntime.InferenceSession(folder + "/text_model.onnx")
        vision = onnxruntime.InferenceSession(folder + "/vision_model.onnx")
        assert [i.name for i in text.get_inputs()] == ["input_ids", "attention_mask"]
        assert all(isinstance(d, str) for d in text.get_inputs()[0].shape), text.get_inputs()[0].shape  # dynamic
        texts = ["a", "a large red circle on the left of a small blue square", "two green stars", "the top"]
        batches = []
        for side in ("left", "right"):
            processor.tokenizer.padding_side = side
            batches.append(dict(processor.tokenizer(texts, padding=True, return_tensors="pt")))
        batches.append(dict(processor(text=texts[1:])))  # the processor's layout, another batch size and length
        with torch.no_grad():
            for batch in batches:
                expected = model.get_text_features(**batch).pooler_output.numpy()
                got = text.run(None, {{k: v.numpy().astype(np.int64) for k, v in batch.items()}})[0]
                assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4, np.abs(got - expected).max()
            for n in (1, 5):
                pixel_values = torch.randn(n, 3, 32, 32)
                expected = model.get_image_features(pixel_values).pooler_output.numpy()
                got = vision.run(None, {{"pixel_values": pixel_values.numpy()}})[0]
                assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4
        print("OK")
        """,
        cwd=onnx_folder.parent,
    )


def test_existing_files_are_kept_without_overwrite(onnx_folder):
    before = (onnx_folder / "text_model.onnx").stat().st_mtime_ns
    result = run_cli("export-onnx", "--model", str(onnx_folder), cwd=onnx_folder.parent)
    assert result.returncode == 2 and "--overwrite" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert (onnx_folder / "text_model.onnx").stat().st_mtime_ns == before
