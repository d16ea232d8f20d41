"""Export an MM-GEM's two embedding paths to ONNX: `text_model.onnx` and `vision_model.onnx`.

    mmgem export-onnx --model path/to/mmgem-folder            # writes the two files into the folder
    mmgem export-onnx --model you/mmgem --output-dir onnx/    # a Hub repo id: the files go to --output-dir

`text_model.onnx` maps `input_ids`, `attention_mask` (int64, `[batch, length]`, left or right padded, with or
without the final `[EMB]`) to `text_embeds` `[batch, projection_dim]`; `vision_model.onnx` maps `pixel_values`
(float32, `[batch, 3, H, W]`) to `image_embeds`. Both have dynamic batch (and length) axes and give
`get_text_features` / `get_image_features` (`pooler_output`, not normalised). Each export is checked with
onnxruntime against PyTorch on a batch of mixed lengths padded on either side before it is put in place, and the
model card (README.md) lists the files.

Interrupted exports: the two files are written and checked in a `.onnx-export-PID-*` folder, which gets a
`verified` mark before they are moved into place one after the other. A later export first cleans what killed ones
left: a verified folder's remaining files are moved into place (so the two files are always from one export, even
after a kill between the two moves), an unverified folder is deleted. The model card is replaced atomically.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmgem.cli import command_parser
from mmgem.errors import checking_user_input
from mmgem.files import write_text_atomic
from mmgem.loading import check_hub_id, load_model

TEXT_FILE = "text_model.onnx"
VISION_FILE = "vision_model.onnx"
DEFAULT_OPSET = 18
DEFAULT_ATOL = 1e-4
# Texts of very different lengths, so that the check covers padding on both sides.
PROBE_TEXTS = ["a photo", "a large red circle on the left of a small blue square", "two dogs", "one"]
CARD_BEGIN, CARD_END = "<!-- onnx-export:begin -->", "<!-- onnx-export:end -->"
STAGING_PREFIX = ".onnx-export-"
VERIFIED_MARK = "verified"  # in a staging folder: both files passed the check and may be moved into place


class TextEmbedder(nn.Module):
    """`get_text_features(...).pooler_output` as a module with tensor inputs, for the exporter."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(input_ids, attention_mask).pooler_output


class ImageEmbedder(nn.Module):
    """`get_image_features(...).pooler_output` as a module, for the exporter."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values).pooler_output


def _export(module: nn.Module, inputs: dict[str, torch.Tensor], output_name: str, path: Path, opset: int) -> None:
    """torch.export-based ONNX export with every axis of every input dynamic (batch, and length for texts)."""
    dynamic = {name: {axis: torch.export.Dim.DYNAMIC for axis in range(2)} for name in inputs}
    if "pixel_values" in inputs:
        dynamic = {"pixel_values": {0: torch.export.Dim.DYNAMIC}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on axis names and deprecated pytree helpers
        program = torch.onnx.export(
            module,
            kwargs=inputs,
            input_names=list(inputs),
            output_names=[output_name],
            dynamic_shapes=dynamic,
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    program.save(str(path))


def text_probe(processor: Any, side: str, texts: list[str] | None = None) -> dict[str, np.ndarray]:
    """`texts` tokenised WITHOUT the processor's layout (no `<bos>`, no `[EMB]`) and padded on `side`, as a
    tokenizer-only client would feed `text_model.onnx`; plus the processor's own layout, right padded."""
    tokenizer = processor.tokenizer
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        encoded = tokenizer(texts or PROBE_TEXTS, padding=True, return_tensors="np")
    finally:
        tokenizer.padding_side = previous
    return {
        "input_ids": encoded["input_ids"].astype(np.int64),
        "attention_mask": encoded["attention_mask"].astype(np.int64),
    }


def check_onnx_files(model: Any, processor: Any, folder: Path, atol: float = DEFAULT_ATOL) -> dict[str, float]:
    """Largest |onnxruntime - PyTorch| of each file on mixed-length texts (left and right padded, with and without
    `[EMB]`) and on two batch sizes of images; raises if one exceeds `atol`."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    text = onnxruntime.InferenceSession(str(folder / TEXT_FILE), options, providers=["CPUExecutionProvider"])
    vision = onnxruntime.InferenceSession(str(folder / VISION_FILE), options, providers=["CPUExecutionProvider"])
    text_batches = [text_probe(processor, "left"), text_probe(processor, "right")]
    text_batches.append({k: v.numpy() for k, v in processor(text=PROBE_TEXTS[:3]).items()})
    diffs = {"text": 0.0, "vision": 0.0}
    size = model.config.vision_config.image_size
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch in text_batches:
            expected = model.get_text_features(**{k: torch.from_numpy(v) for k, v in batch.items()}).pooler_output
            got = text.run(None, batch)[0]
            diffs["text"] = max(diffs["text"], float(np.abs(got - expected.float().numpy()).max()))
        for batch_size in (1, 3):
            pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
            expected = model.get_image_features(pixel_values).pooler_output
            got = vision.run(None, {"pixel_values": pixel_values.numpy()})[0]
            diffs["vision"] = max(diffs["vision"], float(np.abs(got - expected.float().numpy()).max()))
    for name, diff in diffs.items():
        if not diff <= atol:
            raise RuntimeError(f"the exported {name} model differs from PyTorch by {diff:.3g} (> {atol}).")
    return diffs


def card_section(model: Any, opset: int) -> str:
    """The model card's ONNX section: files, inputs and outputs, and how to run them."""
    size, dim = model.config.vision_config.image_size, model.config.projection_dim
    text_row = (
        f"| `{TEXT_FILE}` | `input_ids`, `attention_mask`: int64 `[batch, length]` | `text_embeds` `[batch, {dim}]` |"
    )
    vision_row = (
        f"| `{VISION_FILE}` | `pixel_values`: float32 `[batch, 3, {size}, {size}]` | `image_embeds` `[batch, {dim}]` |"
    )
    return f"""{CARD_BEGIN}
## ONNX

| File | Inputs | Output |
|---|---|---|
{text_row}
{vision_row}

Batch and length are dynamic (opset {opset}). The outputs equal `get_text_features` / `get_image_features`
(`pooler_output`, not normalised) to 1e-4; the `[EMB]` token is appended inside the graph when the ids lack it.

```python
import numpy as np
import onnxruntime
from transformers import AutoProcessor

processor = AutoProcessor.from_pretrained("path/to/this/folder", trust_remote_code=True)
text = onnxruntime.InferenceSession("path/to/this/folder/{TEXT_FILE}")
inputs = processor(text=["a photo of a dog", "a cat"])
(text_embeds,) = text.run(None, {{k: v.numpy() for k, v in inputs.items()}})
```
{CARD_END}
"""


def update_model_card(folder: Path, section: str) -> None:
    """Add (or replace) the ONNX section of `folder/README.md`; a folder without a card gets one with it."""
    card = folder / "README.md"
    text = card.read_text(encoding="utf-8") if card.exists() else ""
    pattern = re.compile(re.escape(CARD_BEGIN) + ".*?" + re.escape(CARD_END) + "\n?", re.DOTALL)
    text = pattern.sub("", text).rstrip("\n")
    # A new file renamed over the card: a kill leaves the old card or the new one, and a card that is a link to a
    # file elsewhere is replaced, not written through.
    write_text_atomic(card, (text + "\n\n" if text else "") + section)


def _owner_alive(staging: Path) -> bool:
    owner = staging.name[len(STAGING_PREFIX) :].split("-", 1)[0]
    if not owner.isdigit() or int(owner) == os.getpid():
        return False
    try:
        os.kill(int(owner), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _move_into_place(staging: Path, output_dir: Path) -> None:
    for target in (TEXT_FILE, VISION_FILE):
        for produced in sorted(staging.glob(target + "*")):  # the graph, and external weights if any
            os.replace(produced, output_dir / produced.name)


def clean_leftovers(output_dir: Path) -> list[str]:
    """Finish or remove what killed exports into `output_dir` left (see the module docstring); returns what was
    done, one line each. Folders of exports still running are left alone."""
    done = []
    for staging in sorted(output_dir.glob(STAGING_PREFIX + "*")):
        if staging.is_symlink() or not staging.is_dir() or _owner_alive(staging):
            continue
        if (staging / VERIFIED_MARK).is_file() and any(staging.glob("*.onnx*")):
            _move_into_place(staging, output_dir)
            done.append(f"finished the export killed while moving its files into place ({staging.name})")
        else:
            done.append(f"removed {staging.name}, left by a killed export")
        shutil.rmtree(staging, ignore_errors=True)
    return done


def export_onnx(
    model: str | Path,
    output_dir: str | Path | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    atol: float = DEFAULT_ATOL,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Write `text_model.onnx` and `vision_model.onnx` for the MM-GEM at `model` (folder or Hub repo id).

    Args:
        model: an MM-GEM folder (checked first) or a Hub repo id.
        output_dir: where the files go; defaults to the folder `model` itself (so that it can be published as is).
        opset: the ONNX opset.
        overwrite: replace existing ONNX files.
        atol: the largest onnxruntime-vs-PyTorch difference accepted.
        trust_remote_code: allow a folder's own tokenizer / image-processor code (MM-GEM needs none).

    Returns:
        `{"text_model": path, "vision_model": path, "max_abs_diff": {"text": ..., "vision": ...}}`.
    """
    with checking_user_input():  # every argument is checked before the (long) export starts
        local = Path(model).expanduser()
        if not local.is_dir():
            check_hub_id(str(model), "--model")
        if output_dir is None:
            if not local.is_dir():
                raise FileNotFoundError(
                    f"`--model` {str(model)!r} is not a local folder: pass `--output-dir` to export a Hub repo id."
                )
            output_dir = local
        output_dir = Path(output_dir)
        if output_dir.exists() and not output_dir.is_dir():
            raise NotADirectoryError(f"`--output-dir` {output_dir} is a file; expected a folder.")
        for line in clean_leftovers(output_dir) if output_dir.is_dir() else []:
            print(f"{output_dir}: {line}", flush=True)
        targets = [output_dir / TEXT_FILE, output_dir / VISION_FILE]
        existing = [p.name for p in targets if p.exists()]
        if existing and not overwrite:
            raise FileExistsError(
                f"`--output-dir` {output_dir} already holds {', '.join(existing)}; pass `--overwrite` to replace them."
            )
        model_obj, processor = load_model(str(local) if local.is_dir() else str(model), trust_remote_code, "--model")
    model_obj = model_obj.float().eval()
    output_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=f"{STAGING_PREFIX}{os.getpid()}-") as staging:
        staging = Path(staging)
        text_inputs = {k: torch.from_numpy(v) for k, v in text_probe(processor, "left").items()}
        size = model_obj.config.vision_config.image_size
        print(f"exporting {TEXT_FILE} ...", flush=True)
        _export(TextEmbedder(model_obj), text_inputs, "text_embeds", staging / TEXT_FILE, opset)
        print(f"exporting {VISION_FILE} ...", flush=True)
        _export(
            ImageEmbedder(model_obj),
            {"pixel_values": torch.zeros(2, 3, size, size)},
            "image_embeds",
            staging / VISION_FILE,
            opset,
        )
        diffs = check_onnx_files(model_obj, processor, staging, atol)
        (staging / VERIFIED_MARK).touch()  # from here on, a killed export is finished by the next one
        _move_into_place(staging, output_dir)
    update_model_card(output_dir, card_section(model_obj, opset))
    return {"text_model": targets[0], "vision_model": targets[1], "max_abs_diff": diffs}


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "export-onnx",
        "Write text_model.onnx and vision_model.onnx (dynamic batch and length), checked against PyTorch.",
    )
    parser.add_argument("--model", required=True, help="an MM-GEM folder (checked first) or a Hub repo id")
    parser.add_argument("--output-dir", default=None, help="where the files go (default: the --model folder)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--overwrite", action="store_true", help="replace existing ONNX files")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="largest accepted difference to PyTorch")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the folder's own tokenizer code")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = export_onnx(
        args.model,
        args.output_dir,
        opset=args.opset,
        overwrite=args.overwrite,
        atol=args.atol,
        trust_remote_code=args.trust_remote_code,
    )
    diffs = result["max_abs_diff"]
    print(f"wrote {result['text_model']} (max |onnxruntime - torch| {diffs['text']:.2g})")
    print(f"wrote {result['vision_model']} (max |onnxruntime - torch| {diffs['vision']:.2g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
