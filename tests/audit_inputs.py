"""Re-runnable hardening audit: hostile folders, hostile inputs, hostile data in every format and interrupted runs,
tried against the code; prints one row per area (cases tried, cases that behaved well) and every case that did not.

    python -m tests.audit_inputs                    # a few minutes on 2 CPU cores
    python -m tests.audit_inputs --fuzz 50          # fewer random processor / model inputs per kind
    python -m tests.audit_inputs --areas data       # only the areas whose name contains "data"

"Behaved well" means: refused before any work with a ValueError / TypeError that names the argument (or the
record's line, or the folder), or the correct result; a bad record under `--data-on-error skip` dropped and
counted; never code from a folder run without opt-in, never a file opened or a URL fetched for a text, never a
file outside the data root read, never a silently wrong result, never a secret in a file. The exit status is 1
when any case did not behave well.

This module is the one copy of the audit: pytest does not collect it (no `test_` prefix), tests/test_hardening.py
runs its data area (`test_the_audit_data_area_behaves_well`) and imports its helpers, and the tests in
tests/test_hardening.py, tests/test_data_limits.py, tests/test_interrupted.py and tests/test_properties.py check the
same behaviours case by case.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmgem.build import tiny_mmgem
from mmgem.conversion import publish
from mmgem.conversion.publish import export_files
from mmgem.data.records import load_jsonl_records
from mmgem.integrations.sentence_transformers import load_sentence_transformer
from mmgem.loading import load_model
from mmgem.training.arguments import make_arguments
from mmgem.training.checkpoints import last_complete_checkpoint
from modeling_mmgem.modeling_mmgem import MMGEMModel
from modeling_mmgem.processing_mmgem import MMGEMProcessor

REPO = Path(__file__).resolve().parent.parent
NAMED = (ValueError, TypeError)


class Audit:
    """Collects (area, case, behaved well, detail) rows."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, bool, str]] = []

    def case(self, area: str, name: str, check: Callable[[], bool | tuple[bool, str]]) -> None:
        try:
            result = check()
            good, detail = result if isinstance(result, tuple) else (bool(result), "")
        except Exception as error:  # an unexpected error is a case that did not behave well
            good, detail = False, f"{type(error).__name__}: {str(error)[:200]}"
        self.rows.append((area, name, good, detail))

    def table(self) -> str:
        areas: dict[str, list[bool]] = {}
        for area, _, good, _ in self.rows:
            areas.setdefault(area, []).append(good)
        lines = ["| Area | Cases tried | Behaved well |", "|---|---:|---:|"]
        lines += [f"| {area} | {len(goods)} | {sum(goods)} |" for area, goods in areas.items()]
        total = [good for _, _, good, _ in self.rows]
        lines.append(f"| **all** | **{len(total)}** | **{sum(total)}** |")
        bad = [f"  - [{a}] {n}: {d}" for a, n, g, d in self.rows if not g]
        return "\n".join(lines + (["", "Did not behave well:"] + bad if bad else []))


def refused(call: Callable[[], Any], *names: str, errors: tuple = NAMED) -> tuple[bool, str]:
    """Whether `call` raises one of `errors` whose message contains every one of `names`."""
    try:
        call()
    except errors as error:
        message = str(error)
        return all(name in message for name in names), message[:160]
    return False, "accepted"


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------------------------------------- folders
def saved_model(root: Path) -> Path:
    torch.manual_seed(0)
    model, processor = tiny_mmgem()
    folder = root / "clean"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def hostile_copy(clean: Path, root: Path, kind: str, marker: Path) -> Path:
    folder = Path(shutil.copytree(clean, root / f"hostile-{kind}"))
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    code += "from transformers import PreTrainedTokenizerFast, CLIPImageProcessor\n"
    code += "class EvilTokenizer(PreTrainedTokenizerFast): pass\nclass EvilImageProcessor(CLIPImageProcessor): pass\n"
    (folder / "evil.py").write_text(code)
    if kind == "tampered remote code":
        for name in ("configuration_mmgem.py", "processing_mmgem.py", "modeling_mmgem.py"):
            with open(folder / name, "a") as file:
                file.write("\n" + code.splitlines()[0] + "\n" + code.splitlines()[1] + "\n")
    elif kind == "tokenizer auto_map":
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    elif kind == "image-processor auto_map":
        config = json.loads((folder / "processor_config.json").read_text())
        config["image_processor"]["auto_map"] = {"AutoImageProcessor": "evil.EvilImageProcessor"}
        (folder / "processor_config.json").write_text(json.dumps(config))
    return folder


def audit_remote_code(audit: Audit, clean: Path, root: Path) -> None:
    loaders = {
        "load_model (mmgem train/evaluate --model)": lambda f: load_model(f),
        "load_sentence_transformer": lambda f: load_sentence_transformer(f, device="cpu"),
    }
    for kind in ("tampered remote code", "tokenizer auto_map", "image-processor auto_map"):
        for loader_name, loader in loaders.items():
            marker = root / f"marker-{len(audit.rows)}"
            folder = hostile_copy(clean, root / f"r{len(audit.rows)}", kind, marker)

            def check(loader=loader, folder=folder, marker=marker) -> tuple[bool, str]:
                try:
                    loader(folder)
                    outcome = "loaded with the installed classes"
                except ValueError as error:
                    outcome = f"refused: {str(error)[:80]}"
                return not marker.exists(), outcome + ("" if not marker.exists() else "; THE FOLDER'S CODE RAN")

            audit.case("1 remote code without opt-in", f"{kind} via {loader_name}", check)


def audit_broken_folders(audit: Audit, clean: Path, root: Path) -> None:
    def config_edit(**changes: Any) -> Callable[[Path], None]:
        def edit(folder: Path) -> None:
            config = json.loads((folder / "config.json").read_text())
            for key, value in changes.items():
                target = config
                *parents, leaf = key.split(".")
                for parent in parents:
                    target = target[parent]
                target[leaf] = value
            (folder / "config.json").write_text(json.dumps(config))

        return edit

    damages: dict[str, tuple[Callable[[Path], None], str]] = {
        "no config.json (interrupted save)": (lambda f: (f / "config.json").unlink(), "config.json"),
        "empty config.json": (lambda f: (f / "config.json").write_text(""), "config.json"),
        "corrupted config.json": (lambda f: (f / "config.json").write_text('{"model_type": "mm'), "config.json"),
        "config.json of another model type": (config_edit(model_type="llama"), "model_type"),
        "config.json is a list": (lambda f: (f / "config.json").write_text("[]"), "model_type"),
        "no tokenizer files": (lambda f: (f / "tokenizer.json").unlink(), "tokenizer"),
        "emb_token_id on an ordinary token": (config_edit(emb_token_id=10), "emb_token_id"),
        "cap_token_id and image_token_id swapped": (lambda f: _swap(f, "cap_token_id", "image_token_id"), "token_id"),
        "eos_token_id 99999": (config_edit(**{"text_config.eos_token_id": 99999}), "eos_token_id"),
        "pad_token_id outside the vocabulary": (config_edit(**{"text_config.pad_token_id": 5000}), "pad_token_id"),
        "negative bos_token_id": (config_edit(**{"text_config.bos_token_id": -1}), "bos_token_id"),
        "vocabulary smaller than the tokenizer": (config_edit(**{"text_config.vocab_size": 200}), "vocab"),
        "emb_token_id a string": (config_edit(emb_token_id="7"), "emb_token_id"),
    }
    built: list[int] = []
    original_init = MMGEMModel.__init__

    def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        built.append(1)
        original_init(self, *args, **kwargs)

    for name, (damage, expected) in damages.items():
        folder = Path(shutil.copytree(clean, root / f"broken-{len(audit.rows)}"))
        damage(folder)

        def check(folder: Path = folder, expected: str = expected) -> tuple[bool, str]:
            built.clear()
            MMGEMModel.__init__ = counting_init
            try:
                good, detail = refused(lambda: load_model(folder), expected)
            finally:
                MMGEMModel.__init__ = original_init
            return good and not built, detail + (" (a model was built first)" if built else "")

        audit.case("2+7 folders that are not a consistent MM-GEM", name, check)


def _swap(folder: Path, a: str, b: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    config[a], config[b] = config[b], config[a]
    (folder / "config.json").write_text(json.dumps(config))


# ---------------------------------------------------------------------------------------------- URLs and texts
def audit_urls_and_texts(audit: Audit, clean: Path, root: Path) -> None:
    processor = MMGEMProcessor.from_pretrained(clean)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}/cat.png"

    def bounded_time() -> tuple[bool, str]:
        start = time.monotonic()
        with environment(MMGEM_IMAGE_URL_TIMEOUT="1"):
            good, detail = refused(lambda: processor(images=[silent_url]), "images[0]")
        return good and time.monotonic() - start < 5, f"{time.monotonic() - start:.1f} s: {detail}"

    audit.case("3 URLs and texts", "image URL of a server that never answers", bounded_time)
    big = root / "big.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (600, 600, 3), dtype=np.uint8)).save(big)
    with environment(MMGEM_MAX_IMAGE_BYTES="100000"):
        audit.case(
            "3 URLs and texts",
            "image file over the byte limit",
            lambda: refused(lambda: processor(images=[str(big)]), "images[0]", "bytes"),
        )
    st = load_sentence_transformer(clean, device="cpu")
    secret = root / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    texts = {
        "text naming an existing .png file": str(secret),
        "text that is an http URL ending in .png": silent_url,
        "text that is a data:image URI": "data:image/png;base64," + "A" * 80,
        "text ending in .JPG naming a file": str(shutil.copy(secret, root / "photo.JPG")),
    }
    for name, text in texts.items():
        audit.case(
            "3 URLs and texts",
            f"sentence-transformers: {name}",
            lambda text=text: refused(lambda: st.encode([text]), "does not open files or URLs"),
        )
    audit.case(
        "3 URLs and texts",
        'sentence-transformers: {"text": path} embeds as a text',
        lambda: st.encode([{"text": str(secret)}]).shape == (1, 32),
    )
    silent.close()


# ---------------------------------------------------------------------------------------------- records
def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width x height` pixels (a decompression bomb needs no more to be refused)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


def audit_records(audit: Audit, clean: Path, root: Path) -> None:
    data = root / "data"
    data.mkdir()
    Image.new("RGB", (32, 32), "red").save(data / "good.png")
    Image.new("RGB", (32, 32), "red").save(data / "good.jpg")
    png, jpg = (data / "good.png").read_bytes(), (data / "good.jpg").read_bytes()
    (data / "truncated.png").write_bytes(png[: len(png) // 2])
    (data / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (data / "bomb.png").write_bytes(png_claiming(20_000, 20_000))
    (data / "bomb90.png").write_bytes(png_claiming(9_500, 9_500))
    (data / "empty.png").write_bytes(b"")
    (data / "text.png").write_text("not an image")
    outside = root / "outside.png"
    Image.new("RGB", (32, 32)).save(outside)
    (data / "link.png").symlink_to(outside)
    good = {"image": "good.png", "caption": "a red square"}
    bad_records = {
        "truncated PNG": {"image": "truncated.png", "caption": "x"},
        "truncated JPEG": {"image": "truncated.jpg", "caption": "x"},
        "decompression bomb (400 MP header)": {"image": "bomb.png", "caption": "x"},
        "90 MP header (PIL only warns)": {"image": "bomb90.png", "caption": "x"},
        "empty file": {"image": "empty.png", "caption": "x"},
        "text file named .png": {"image": "text.png", "caption": "x"},
        "missing file": {"image": "nope.png", "caption": "x"},
        "absolute path outside the data folder": {"image": str(outside), "caption": "x"},
        "../ path": {"image": "../outside.png", "caption": "x"},
        "symlink leading outside": {"image": "link.png", "caption": "x"},
        "box outside the image": {**good, "regions": [{"box": [0, 0, 40, 8], "caption": "r"}]},
        "NaN box": {**good, "regions": [{"box": [0, 0, float("nan"), 8], "caption": "r"}]},
        "600 regions": {**good, "regions": [{"box": [0, 0, 8, 8], "caption": "r"}] * 600},
        "empty caption": {"image": "good.png", "caption": " "},
        "caption not a string": {"image": "good.png", "caption": 5},
        "image not a string": {"image": 5, "caption": "x"},
    }
    for name, record in bad_records.items():
        path = data / f"case-{len(audit.rows)}.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")

        def check(path: Path = path) -> tuple[bool, str]:
            good_fail, detail = refused(lambda: load_jsonl_records(path), "line 2")

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kept = load_jsonl_records(path, on_error="skip")
            return good_fail and len(kept) == 1, detail

        audit.case("4 bad records (fail: named line; skip: dropped)", name, check)
    processor = MMGEMProcessor.from_pretrained(clean)
    image = Image.new("RGB", (32, 32))
    for caption in ("a red <image>", "[EMB] and [CAP]", "</s><s><pad>"):

        def check(caption: str = caption) -> tuple[bool, str]:
            batch = processor(images=[image], text=[caption])
            image_id = processor._special_ids()["image"]
            placeholders = int((batch["input_ids"] == image_id).sum())
            return placeholders == processor.num_image_tokens, f"{placeholders} <image> placeholders"

        audit.case("4 bad records (fail: named line; skip: dropped)", f"caption {caption!r} stays text", check)


# ---------------------------------------------------------------------------------------------- caps
def audit_caps(audit: Audit, clean: Path, root: Path) -> None:
    processor = MMGEMProcessor.from_pretrained(clean)
    model = MMGEMModel.from_pretrained(clean).eval()
    image = Image.new("RGB", (32, 32))
    area = "5 caps (pixels, aspect ratio, boxes)"
    cases = {
        "1 x 100,000 uint8 array": lambda: processor(images=[np.zeros((1, 100_000), np.uint8)]),
        "100,000 x 1 PIL image": lambda: processor(images=[Image.new("L", (100_000, 1))]),
        "90 MP PNG header": lambda: processor(images=[png_claiming(9_500, 9_500)]),
        "180 MP PNG header": lambda: processor(images=[png_claiming(13_500, 13_500)]),
        "600 boxes for one image (processor)": lambda: processor(images=[image], boxes=[[[0, 0, 8, 8]] * 600]),
        "600 boxes for one image (model)": lambda: model.get_image_features(
            pixel_values=processor(images=[image])["pixel_values"], boxes=[torch.tensor([[0, 0, 0.5, 0.5]] * 600)]
        ),
    }
    for name, call in cases.items():
        audit.case(area, name, lambda call=call: refused(call, "`"))


# ---------------------------------------------------------------------------------------------- fuzzed inputs
def expected_pixels(processor: Any, array: np.ndarray, channels_first: bool) -> torch.Tensor:
    """The documented reading of a valid array image (see `load_rgb_image`), computed without the loader: the
    oracle of the fuzzed cases here and of tests/test_properties.py."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and (channels_first or array.shape[-1] not in (1, 3, 4)):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype.kind == "f":
        array = np.rint(array.astype(np.float32) * 255.0)
    pil = Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)))
    if pil.mode in ("RGBA", "LA"):
        pil = Image.alpha_composite(Image.new("RGBA", pil.size, (255, 255, 255, 255)), pil.convert("RGBA"))
    return processor.image_processor(images=[pil.convert("RGB")], return_tensors="pt")["pixel_values"]


def valid_array(array: np.ndarray) -> bool:
    if array.dtype.kind not in "uif" or min(array.shape[:2] if array.ndim == 2 else array.shape) < 1:
        return False
    if array.dtype.kind == "f" and (not np.isfinite(array).all() or array.min() < 0 or array.max() > 1):
        return False
    if array.dtype.kind in "ui" and (array.min() < 0 or array.max() > 255):
        return False
    return array.ndim == 2 or (array.ndim == 3 and (array.shape[-1] in (1, 3, 4) or array.shape[0] in (1, 3, 4)))


def random_array(rng: np.random.RandomState) -> np.ndarray:
    dtype = rng.choice(["uint8", "int16", "int64", "float16", "float32", "float64", "bool", "complex64", "object"])
    h, w = rng.randint(1, 12, size=2)
    shape = [(h, w), (h, w, rng.randint(1, 6)), (rng.randint(1, 6), h, w)][rng.randint(3)]
    if dtype.startswith("float"):
        values = rng.uniform(0, 1, shape) if rng.rand() < 0.5 else rng.uniform(-1, 300, shape)
        if rng.rand() < 0.2:
            values.flat[rng.randint(values.size)] = rng.choice([np.nan, np.inf, 1.0001, -0.0001])
    elif dtype == "uint8":
        values = rng.randint(0, 256, shape)
    else:
        values = rng.randint(0, 256, shape) if rng.rand() < 0.5 else rng.randint(-300, 300, shape)
    return np.asarray(values).astype(dtype)


def audit_fuzz(audit: Audit, clean: Path, count: int) -> None:
    processor = MMGEMProcessor.from_pretrained(clean)
    model = MMGEMModel.from_pretrained(clean).eval()
    rng = np.random.RandomState(0)
    area = "6 fuzzed processor and model inputs"
    for i in range(count * 4):
        array = random_array(rng)
        as_tensor = bool(rng.rand() < 0.5) and array.dtype != object
        if as_tensor and array.dtype.kind == "f" and rng.rand() < 0.3:
            image: Any = torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
            array = image.float().numpy()
        else:
            image = torch.from_numpy(array) if as_tensor else array

        def check(image: Any = image, array: np.ndarray = array, as_tensor: bool = as_tensor) -> tuple[bool, str]:
            try:
                pixel_values = processor(images=[image])["pixel_values"]
            except NAMED as error:
                ratio = max(array.shape[-2:] if as_tensor and array.ndim == 3 else array.shape[:2]) / max(
                    1, min(array.shape[-2:] if as_tensor and array.ndim == 3 else array.shape[:2])
                )
                return ("images[0]" in str(error)) and (not valid_array(array) or ratio > 32), str(error)[:100]
            if not valid_array(array):
                return False, f"accepted an invalid {array.dtype} array of shape {array.shape}"
            same = torch.allclose(pixel_values, expected_pixels(processor, array, as_tensor))
            return same, "" if same else "pixels differ from the documented reading"

        audit.case(area, f"image array #{i}", check)
    pieces = ["a", " red", "<image>", "[EMB]", "[CAP]", "<s>", "</s>", "<pad>", " ", "é", "\n"]
    emb = processor._special_ids()["emb"]
    control = set(processor.tokenizer.all_special_ids) | set(processor._special_ids().values())
    for i in range(count * 2):
        texts = ["".join(rng.choice(pieces, size=rng.randint(0, 6))) for _ in range(rng.randint(0, 3))]

        def check_text(texts: list[str] = texts) -> tuple[bool, str]:
            try:
                batch = processor(text=texts)
            except NAMED as error:
                return "`text" in str(error) and (not texts or any(not t.strip() for t in texts)), str(error)[:100]
            for row, mask, text in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), texts):
                tokens = [t for t, m in zip(row, mask) if m]
                body = tokens[1:-1]
                if tokens[-1] != emb or control.intersection(body) or processor.tokenizer.decode(body) != text:
                    return False, f"{text!r} misread"
            return True, ""

        audit.case(area, f"texts #{i}", check_text)
    vocab_size = model.config.text_config.vocab_size
    others = {
        "text=5": lambda: processor(text=5),
        "text=[]": lambda: processor(text=[]),
        "text=[None]": lambda: processor(text=[None]),
        "region_text='ab' for 2 boxes": lambda: processor(
            images=[Image.new("RGB", (32, 32))], text=["c"], boxes=[[[0, 0, 8, 8], [0, 0, 9, 9]]], region_text="ab"
        ),
        "NaN pixel_values": lambda: model.get_image_features(pixel_values=torch.full((1, 3, 32, 32), float("nan"))),
        "integer pixel_values": lambda: model.get_image_features(pixel_values=torch.zeros(1, 3, 32, 32).long()),
        "0-image pixel_values": lambda: model.get_image_features(pixel_values=torch.zeros(0, 3, 32, 32)),
        "token id = vocab size": lambda: model.get_text_features(input_ids=torch.tensor([[1, vocab_size]])),
        "negative token id": lambda: model.get_text_features(input_ids=torch.tensor([[1, -5]])),
        "0-row input_ids": lambda: model.get_text_features(input_ids=torch.zeros(0, 4, dtype=torch.long)),
        "image of an LA numpy array (H, W, 2)": lambda: processor(images=[np.zeros((8, 8, 2), np.uint8)]),
        "object array": lambda: processor(images=[np.array([[object()]])]),
        "complex tensor": lambda: processor(images=[torch.zeros(3, 8, 8, dtype=torch.complex64)]),
    }
    for name, call in others.items():
        argument = "region_text" if "region_text" in name else "text" if name.startswith("text") else None
        argument = argument or ("pixel_values" if "pixel_values" in name else "input_ids" if "id" in name else "images")
        audit.case(area, name, lambda call=call, argument=argument: refused(call, argument))
    # The correct side of the ambiguous layouts: a CHW tensor of width 3 is channels first.
    chw = torch.rand(3, 8, 3)
    expected = expected_pixels(processor, chw.numpy(), channels_first=True)
    audit.case(
        area,
        "CHW tensor of width 3 read as CHW",
        lambda: torch.allclose(processor(images=[chw])["pixel_values"], expected),
    )
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        audit.case(
            area,
            "bf16 tensor image accepted",
            lambda: processor(images=[torch.rand(3, 8, 8).bfloat16()])["pixel_values"].shape == (1, 3, 32, 32),
        )
        audit.case(
            area,
            "valid ids embed finitely",
            lambda: bool(torch.isfinite(model.get_text_features(input_ids=ids).pooler_output).all()),
        )


# ---------------------------------------------------------------------------------------------- interrupted runs
def audit_interrupted(audit: Audit, root: Path) -> None:
    area = "8 interrupted runs"

    def checkpoints(kinds: list[str]) -> Path:
        folder = Path(tempfile.mkdtemp(dir=root))
        for step, kind in enumerate(kinds, start=1):
            checkpoint = folder / f"checkpoint-{step}"
            checkpoint.mkdir()
            if kind != "no weights":
                (checkpoint / "model.safetensors").write_bytes(b"w")
            if kind == "complete" or kind == "no weights":
                (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
            elif kind == "truncated state":
                (checkpoint / "trainer_state.json").write_text('{"global_st')
        return folder

    for last in ("no trainer_state.json", "truncated state", "no weights"):
        folder = checkpoints(["complete", "complete", last])
        audit.case(
            area,
            f"resume latest, newest checkpoint has {last}",
            lambda folder=folder: last_complete_checkpoint(folder) == str(folder / "checkpoint-2"),
        )
    dead = 2**22 + 4321

    def leftovers(kind: str, output_exists: bool) -> tuple[bool, str]:
        parent = Path(tempfile.mkdtemp(dir=root))
        output = parent / "model"
        if output_exists:
            output.mkdir()
            (output / "config.json").write_text("{}")
        left = parent / f".model.{kind}-{dead}-abcd"
        left.mkdir()
        (left / "config.json").write_text('{"left": 1}')
        publish.clean_leftovers(output)
        restored = kind == "old" and not output_exists
        if restored:
            return (not left.exists()) and json.loads((output / "config.json").read_text()) == {"left": 1}, "restored"
        return not left.exists(), "removed" if not left.exists() else "left behind"

    for kind in ("partial", "old"):
        for exists in (True, False):
            audit.case(
                area,
                f"killed conversion's .{kind}- folder, output {'present' if exists else 'missing'}",
                lambda kind=kind, exists=exists: leftovers(kind, exists),
            )
    audit.case(area, "reload-check child dies with a SIGKILLed conversion", lambda: child_dies(root))


def child_dies(root: Path) -> tuple[bool, str]:
    code = (
        "import os; from pathlib import Path; import mmgem.conversion.publish as p\n"
        "p.torch.save = lambda obj, path: os.mkfifo(path)\n"
        f"p.verify_in_subprocess(Path({str(root)!r}), {{}})\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    child = None
    try:
        deadline = time.monotonic() + 120
        while child is None and time.monotonic() < deadline:
            listing = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
            found = listing.read_text().split() if listing.exists() else []
            child = int(found[0]) if found else None
            time.sleep(0.1)
        if child is None:
            return False, "no child seen"
        time.sleep(0.5)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        start = time.monotonic()
        while time.monotonic() - start < 10:
            stat = Path(f"/proc/{child}/stat")
            if not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z":
                return True, f"gone after {time.monotonic() - start:.1f} s"
            time.sleep(0.1)
        return False, "still running 10 s after its parent died"
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- publishing
def audit_publishing(audit: Audit, clean: Path, root: Path) -> None:
    area = "9 publishing"
    secret = "hf_auditSecretTokenValue123"
    folder = Path(shutil.copytree(clean, root / "export"))
    (folder / "README.md").write_text("# m\n")
    exported = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    (root / "outside.json").write_text(json.dumps({"token": secret}))
    strays = {
        ".env": lambda: (folder / ".env").write_text(f"HF_TOKEN={secret}"),
        "symlink to a file outside": lambda: (folder / "linked.json").symlink_to(root / "outside.json"),
        ".git/ folder": lambda: ((folder / ".git").mkdir(), (folder / ".git" / "config").write_text("x")),
        "notes.md": lambda: (folder / "notes.md").write_text("private"),
        "__pycache__/": lambda: ((folder / "__pycache__").mkdir(), (folder / "__pycache__" / "m.pyc").write_text("")),
        "nested .py file": lambda: ((folder / "sub").mkdir(), (folder / "sub" / "evil.py").write_text("x")),
    }
    for name, make in strays.items():
        make()
        audit.case(
            area,
            f"push leaves out {name}",
            lambda: sorted(p.relative_to(folder).as_posix() for p in export_files(folder)[0]) == exported,
        )
    args = make_arguments(from_scratch="tiny", data=".", output_dir=str(root / "o"), hub_token=secret)
    buffer = io.BytesIO()
    torch.save(args, buffer)
    audit.case(area, "--hub_token not in training_args.bin", lambda: secret.encode() not in buffer.getvalue())
    audit.case(area, "--hub_token still usable in the process", lambda: args.hub_token == secret)


# The import names of the optional extras' packages (setup.py EXTRAS, "dev" excepted): a test suite installed with
# `pip install -e '.[dev]'` has none of them.
OPTIONAL_MODULES = (
    "nbformat",
    "nbmake",
    "ipykernel",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "mteb",
    "webdataset",
    "datasets",
    "matplotlib",
    "mpl_toolkits",
    "pycocoevalcap",
    "faiss",
    "faiss_cpu",
    "usearch",
    "gradio",
    "gradio_client",
    "playwright",
)


def site_packages_without_extras(folder: Path) -> Path:
    """A folder of links to every entry of this interpreter's site-packages but the extras' packages and metadata
    (what `pip install -e '.[dev]'` leaves, give or take the extras' own dependencies)."""
    import site

    folder.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(site.getsitepackages()[0]):
        name = entry.name.split("-")[0].split(".")[0].lower()  # "nbmake-1.5.5.dist-info", "faiss_cpu.libs" -> name
        if name not in OPTIONAL_MODULES and not entry.name.endswith(".pth"):
            os.symlink(entry.path, folder / entry.name)
    return folder


def collect_without_extras(root: Path) -> subprocess.CompletedProcess:
    """`pytest --collect-only tests` in an interpreter (`python -S`) that sees the installed packages minus every
    optional extra's."""
    packages = site_packages_without_extras(root / "site-packages")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(packages)])}
    command = [sys.executable, "-S", "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def audit_collection(audit: Audit, root: Path) -> None:
    def check() -> tuple[bool, str]:
        result = collect_without_extras(root)
        errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
        return result.returncode == 0, "; ".join(errors[:3]) or (result.stdout.strip().splitlines() or [""])[-1]

    audit.case("10 test suite collects with .[dev] only", "pytest --collect-only tests (no optional extra)", check)


# ---------------------------------------------------------------------------------------------- data formats
def audit_data_formats(audit: Audit, root: Path) -> None:
    """Hostile entries in every format (`--data-on-error`), paths outside the data root, the member and caption caps."""
    from tests import test_data_limits as data

    area = "11 data formats (fail: named; skip: dropped and counted)"
    for number, kind in enumerate(data.HOSTILE):

        def check(kind: str = kind, folder: Path = root / f"hostile-{number}") -> tuple[bool, str]:
            path, options, words = data._hostile(kind, folder)
            good, detail = refused(lambda: list(data._stream(path, **options)), words, "--data-on-error skip")
            dataset = data._stream(path, on_error="skip", **options)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                list(dataset)
            return good and dataset.skipped == 1, f"{detail}; skipped {dataset.skipped}"

        audit.case(area, kind, check)
    jsonl_lines = {
        "JSONL line nested 100,000 deep": data.DEEP,
        "JSONL line with a 5,000-digit integer": data.HUGE_INT,
        "JSONL line with an invalid UTF-8 byte": b'{"caption": "\xff"}',
    }
    for number, (name, line) in enumerate(jsonl_lines.items()):

        def check_line(line: bytes = line, folder: Path = root / f"jsonl-{number}") -> tuple[bool, str]:
            folder.mkdir()
            Image.new("RGB", (8, 8)).save(folder / "a.png")
            path = folder / "records.jsonl"
            path.write_bytes(json.dumps({"image": "a.png", "caption": "c"}).encode() + b"\n" + line + b"\n")
            good, detail = refused(lambda: load_jsonl_records(path), "line 2")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return good and len(load_jsonl_records(path, on_error="skip")) == 1, detail

        audit.case(area, name, check_line)
    root_area = "12 data root (every format refuses ../ and absolute paths)"
    secret = root / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    for kind in ("coco", "llava", "karpathy", "visual-genome", "refcoco", "hf"):
        for how, value in (("../", "../../../secret.png"), ("absolute", str(secret))):

            def check_root(kind: str = kind, value: str = value, folder: Path = root / f"root-{kind}-{how[0]}"):
                path, options = data._outside(kind, folder / "inner", value)
                data_format = "hf" if kind == "hf" else None
                return refused(
                    lambda: list(data._stream(path, data_format=data_format, **options)),
                    "leads outside the data folder",
                )

            audit.case(root_area, f"{kind}: {how} image path", check_root)

    def member_cap() -> tuple[bool, str]:
        path = data._tar(root / "cap" / "00000.tar.gz", [data._web(), {"png": b"\0" * 1_000_000}], gzip=True)
        with environment(MMGEM_MAX_IMAGE_BYTES="100000"):
            return refused(lambda: list(data._stream(path, data_format="webdataset")), "over the 100,000 allowed")

    audit.case("5 caps (pixels, aspect ratio, boxes)", "tar.gz member over MMGEM_MAX_IMAGE_BYTES", member_cap)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fuzz", type=int, default=100, help="random inputs per kind (images: 4x, texts: 2x)")
    parser.add_argument("--skip-collection", action="store_true", help="skip the (slow) test-collection check")
    parser.add_argument("--areas", default="", help="run only the areas whose name contains this word (e.g. data)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.monotonic()
    audit = Audit()
    with tempfile.TemporaryDirectory(prefix="mmgem-audit-") as scratch:
        root = Path(scratch)
        clean = saved_model(root)
        areas: dict[str, Callable[[], None]] = {
            "remote code": lambda: audit_remote_code(audit, clean, root),
            "broken folders": lambda: audit_broken_folders(audit, clean, root),
            "urls and texts": lambda: audit_urls_and_texts(audit, clean, root),
            "records": lambda: audit_records(audit, clean, root),
            "caps": lambda: audit_caps(audit, clean, root),
            "fuzz": lambda: audit_fuzz(audit, clean, args.fuzz),
            "interrupted": lambda: audit_interrupted(audit, root),
            "publishing": lambda: audit_publishing(audit, clean, root),
            "data formats and data root": lambda: audit_data_formats(audit, root),
            "collection": lambda: None if args.skip_collection else audit_collection(audit, root),
        }
        for name, run in areas.items():
            if args.areas in name:
                run()
    print(audit.table())
    print(f"\n({time.monotonic() - start:.0f} s; python -m tests.audit_inputs {' '.join(argv or sys.argv[1:])})")
    return 0 if all(good for _, _, good, _ in audit.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
