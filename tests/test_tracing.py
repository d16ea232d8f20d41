"""The embedding paths trace: torch.compile(fullgraph=True) and torch.export capture them whole, with no Python
branch on tensor values, and the traced programs give the eager embeddings on batches of mixed lengths, padded on
either side. Input checks that read tensor values run eagerly only (before the traced core)."""

from __future__ import annotations

import pytest
import torch

from .conftest import random_images

pytestmark = pytest.mark.fast

TEXTS = ["a red circle", "a large blue square on the left of a star", "x", "the green triangle at the top"]


def _padded(processor, side: str) -> dict[str, torch.Tensor]:
    processor.tokenizer.padding_side = side
    try:
        return dict(processor.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    finally:
        processor.tokenizer.padding_side = "right"


def test_text_and_image_features_compile_with_fullgraph(tiny):
    """Dynamo captures each path as ONE graph (`fullgraph=True` raises on any graph break), also with dynamic
    batch and length; the eager backend keeps the test fast (inductor's code generation is what the benchmark
    measures)."""
    model, processor = tiny
    torch._dynamo.reset()
    text = torch.compile(lambda i, m: model.get_text_features(i, m).pooler_output, fullgraph=True, backend="eager")
    image = torch.compile(lambda p: model.get_image_features(p).pooler_output, fullgraph=True, backend="eager")
    with torch.no_grad():
        for side in ("right", "left"):
            inputs = _padded(processor, side)
            expected = model.get_text_features(**inputs).pooler_output
            got = text(inputs["input_ids"], inputs["attention_mask"])
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        with_emb = processor(text=TEXTS[:3])  # rows already ending in [EMB], another batch size and length
        torch.testing.assert_close(
            text(with_emb["input_ids"], with_emb["attention_mask"]),
            model.get_text_features(**with_emb).pooler_output,
            rtol=0,
            atol=1e-6,
        )
        pixel_values = processor(images=random_images(3))["pixel_values"]
        torch.testing.assert_close(image(pixel_values), model.get_image_features(pixel_values).pooler_output)


def test_text_features_export_with_dynamic_batch_and_length(tiny):
    """torch.export (what the ONNX exporter runs) captures the text path with symbolic batch and length."""
    model, processor = tiny

    class TextEmbedder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model.get_text_features(input_ids, attention_mask).pooler_output

    inputs = _padded(processor, "left")
    dims = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
    program = torch.export.export(
        TextEmbedder(),
        (inputs["input_ids"], inputs["attention_mask"]),
        dynamic_shapes={"input_ids": dims, "attention_mask": dims},
        strict=False,
    )
    other = processor(text=TEXTS[1:])  # another batch size and length, right padded
    with torch.no_grad():
        torch.testing.assert_close(
            program.module()(other["input_ids"], other["attention_mask"]),
            model.get_text_features(**other).pooler_output,
            rtol=0,
            atol=1e-6,
        )


def test_value_checks_still_run_eagerly(tiny):
    model, processor = tiny
    inputs = processor(text=TEXTS[:2])
    inputs["attention_mask"][1] = 0
    with pytest.raises(ValueError, match="empty rows"):
        model.get_text_features(**inputs)
    long_ids = torch.ones(1, model.config.text_config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="context"):
        model.get_text_features(long_ids)


def test_text_inputs_lengths_keep_emb_rows_unchanged(tiny):
    """Rows already ending in `[EMB]` keep their tokens; others get it appended; the width is L + 1 (static)."""
    model, processor = tiny
    emb = model.config.emb_token_id
    ids = torch.tensor([[5, 6, emb], [0, 7, 8]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    out_ids, out_mask, lengths = model._embedding_inputs(ids, mask, emb)
    pad = model.config.text_config.pad_token_id
    assert out_ids.tolist() == [[5, 6, emb, pad], [7, 8, emb, pad]]
    assert out_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]
    assert lengths.tolist() == [3, 3]
