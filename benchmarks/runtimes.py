"""Other runtimes on the same weights: onnxruntime (`mmgem export-onnx`) and `torch.compile` against eager PyTorch.

Both embedding paths, each side timed interleaved after warm-up (compilation and ONNX export happen before timing and
are not counted). The ratios are ours / eager PyTorch: below 1 the other runtime encodes faster.
"""

from __future__ import annotations

import torch

from mmgem.conversion.export_onnx import TEXT_FILE, VISION_FILE, ImageEmbedder, TextEmbedder, _export

from .comparisons import SuiteContext
from .report import Record
from .workloads import embedding_batch, pixel_values


def _inputs(ctx: SuiteContext) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    bm = ctx.bm
    return embedding_batch(bm, bm.spec.text_batch, bm.spec.text_length), pixel_values(bm, bm.spec.image_batch)


def onnx_encode(ctx: SuiteContext) -> list[Record]:
    """onnxruntime (CPU provider, `ctx.threads` threads) on the exported text and vision models vs eager PyTorch."""
    import onnxruntime

    bm, model = ctx.bm, ctx.bm.model
    if bm.device.type != "cpu" or bm.dtype != torch.float32:
        return []  # the export and the CPU provider are float32 on the host
    texts, pixels = _inputs(ctx)
    folder = ctx.workdir / "onnx"
    folder.mkdir(exist_ok=True)
    _export(TextEmbedder(model), dict(texts), "text_embeds", folder / TEXT_FILE, 18)
    _export(ImageEmbedder(model), {"pixel_values": pixels}, "image_embeds", folder / VISION_FILE, 18)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = ctx.threads
    options.inter_op_num_threads = 1
    text_session = onnxruntime.InferenceSession(str(folder / TEXT_FILE), options, providers=["CPUExecutionProvider"])
    vision_session = onnxruntime.InferenceSession(
        str(folder / VISION_FILE), options, providers=["CPUExecutionProvider"]
    )
    text_feed = {k: v.numpy() for k, v in texts.items()}
    image_feed = {"pixel_values": pixels.numpy()}
    with torch.inference_mode():
        text_ours, text_base = ctx.ab(
            lambda: text_session.run(None, text_feed), lambda: model.get_text_features(**texts).pooler_output
        )
        image_ours, image_base = ctx.ab(
            lambda: vision_session.run(None, image_feed), lambda: model.get_image_features(pixels).pooler_output
        )
    return [
        ctx.record("onnx_text_encode", text_ours, "PyTorch eager", text_base, bm.spec.text_batch, notes="onnxruntime"),
        ctx.record(
            "onnx_image_encode", image_ours, "PyTorch eager", image_base, bm.spec.image_batch, notes="onnxruntime"
        ),
    ]


def compiled_encode(ctx: SuiteContext) -> list[Record]:
    """`torch.compile(fullgraph=True)` (inductor) on both embedding paths vs eager, same inputs."""
    bm, model = ctx.bm, ctx.bm.model
    texts, pixels = _inputs(ctx)
    torch._dynamo.reset()
    text_fn = torch.compile(lambda i, m: model.get_text_features(i, m).pooler_output, fullgraph=True)
    image_fn = torch.compile(lambda p: model.get_image_features(p).pooler_output, fullgraph=True)
    with torch.inference_mode():
        text_fn(texts["input_ids"], texts["attention_mask"])  # compile outside the timing
        image_fn(pixels)
        text_ours, text_base = ctx.ab(
            lambda: text_fn(texts["input_ids"], texts["attention_mask"]),
            lambda: model.get_text_features(**texts).pooler_output,
        )
        image_ours, image_base = ctx.ab(
            lambda: image_fn(pixels), lambda: model.get_image_features(pixels).pooler_output
        )
    return [
        ctx.record(
            "compiled_text_encode",
            text_ours,
            "PyTorch eager",
            text_base,
            bm.spec.text_batch,
            notes="torch.compile fullgraph, inductor",
        ),
        ctx.record(
            "compiled_image_encode",
            image_ours,
            "PyTorch eager",
            image_base,
            bm.spec.image_batch,
            notes="torch.compile fullgraph, inductor",
        ),
    ]
