"""Hostile folders and interrupted saves: no code from a model folder runs without opt-in, a folder that is not an
MM-GEM model is refused before anything is built, config and tokenizer must agree, the test suite collects with
the dev extra only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmgem.build import tiny_mmgem
from mmgem.loading import check_model_folder, load_model
from tests.audit_inputs import Audit, audit_data_formats, collect_without_extras, png_claiming

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[1]
# transformers runs a folder's code from a copy in its modules cache: the marker path must be absolute.
EVIL_CODE = """
from pathlib import Path
Path(MARKER).write_text("remote code ran")
from transformers import PreTrainedTokenizerFast, CLIPImageProcessor
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
class EvilImageProcessor(CLIPImageProcessor):
    pass
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A clean saved tiny MM-GEM folder (module-scoped: copy it before changing it)."""
    torch.manual_seed(0)
    model, processor = tiny_mmgem()
    folder = tmp_path_factory.mktemp("saved") / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def copy_of(saved: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(saved, tmp_path / "model"))


def edit_json(path: Path, **changes) -> None:
    content = json.loads(path.read_text())
    content.update(changes)
    path.write_text(json.dumps(content))


@pytest.fixture()
def marker(tmp_path):
    return tmp_path / "EXECUTED"


def evil_code(marker: Path) -> str:
    return EVIL_CODE.replace("MARKER", repr(str(marker)))


@pytest.fixture()
def hostile(saved, tmp_path, marker):
    """A model folder whose copies of the remote code were tampered with, and whose tokenizer and image-processor
    configs point `auto_map` at a file of its own."""
    folder = copy_of(saved, tmp_path)
    for name in ("configuration_mmgem.py", "processing_mmgem.py"):
        with open(folder / name, "a") as file:
            file.write(f"\n__import__('pathlib').Path({str(marker)!r}).write_text('ran')\n")
    (folder / "evil.py").write_text(evil_code(marker))
    edit_json(
        folder / "tokenizer_config.json", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    )
    processor_config = json.loads((folder / "processor_config.json").read_text())
    processor_config["image_processor"]["auto_map"] = {"AutoImageProcessor": "evil.EvilImageProcessor"}
    (folder / "processor_config.json").write_text(json.dumps(processor_config))
    return folder


# ---------------------------------------------------------------------------------------------- 1. remote code
def test_library_loader_refuses_folder_code_without_opt_in(hostile, marker):
    with pytest.raises(ValueError, match=r"trust-remote-code.*") as error:
        load_model(hostile)
    assert "tokenizer_config.json: AutoTokenizer -> evil.EvilTokenizer" in str(error.value)
    assert not marker.exists()


def test_train_and_evaluate_refuse_folder_code(hostile, tmp_path, marker):
    from mmgem.evaluation.evaluate import main as evaluate_main
    from mmgem.synthetic import generate_dataset
    from mmgem.training.train import train

    data = generate_dataset(tmp_path / "data", 4, 2, 2, image_size=32, seed=1, progress=False)
    with pytest.raises(ValueError, match="trust-remote-code"):
        train(model=str(hostile), data=str(data["train"]), output_dir=str(tmp_path / "out"), max_steps=1)
    with pytest.raises(ValueError, match="trust-remote-code"):
        evaluate_main(["--model", str(hostile), "--data", str(data["test"])])
    assert not marker.exists()


def test_the_opt_in_flags_are_in_the_help(capsys):
    from mmgem.cli import main

    for command, flags in (
        ("train", ["--trust-remote-code", "--allow-outside-data-root"]),
        ("evaluate", ["--trust-remote-code", "--allow-outside-data-root"]),
    ):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert all(flag in text or flag.replace("-", "_") in text for flag in flags), text[-2000:]


def test_opting_in_runs_the_folder_code(hostile, marker):
    # The opt-in does what it says: it is the only way the folder's code runs.
    load_model(hostile, trust_remote_code=True)
    assert marker.exists()


def test_sentence_transformers_loader_needs_no_remote_code(saved, hostile, marker):
    from mmgem.integrations.sentence_transformers import load_sentence_transformer

    with pytest.raises(ValueError, match="trust-remote-code"):
        load_sentence_transformer(hostile, device="cpu")
    assert not marker.exists()
    st = load_sentence_transformer(saved, device="cpu")  # the installed classes, no opt-in
    model, processor = tiny_mmgem()  # any model: only the loading path is under test here
    assert st.encode(["a red circle"]).shape == (1, model.config.projection_dim)


def test_lora_base_loader_uses_the_installed_classes(saved, tmp_path):
    from mmgem.integrations.lora import apply_lora, load_lora_adapter
    from modeling_mmgem.modeling_mmgem import MMGEMModel

    base = copy_of(saved, tmp_path)
    model = MMGEMModel.from_pretrained(base)
    apply_lora(model, r=2).save_pretrained(tmp_path / "adapter")
    # config.json's AutoModel entry now points at a file of the folder that must not run.
    (base / "evil.py").write_text(evil_code(tmp_path / "EXECUTED") + "\nclass EvilModel:\n    pass\n")
    edit_json(base / "config.json", auto_map={"AutoModel": "evil.EvilModel", "AutoConfig": "evil.EvilModel"})
    loaded = load_lora_adapter(base, tmp_path / "adapter")
    assert type(loaded.get_base_model()) is MMGEMModel
    assert not (tmp_path / "EXECUTED").exists()


# ---------------------------------------------------------------------------------------------- 2. not a model
def test_folder_without_config_is_refused_before_building(saved, tmp_path, monkeypatch):
    from modeling_mmgem.modeling_mmgem import MMGEMConfig, MMGEMModel

    folder = copy_of(saved, tmp_path)
    (folder / "config.json").unlink()
    built = []
    monkeypatch.setattr(MMGEMModel, "__init__", lambda *a, **k: built.append(1))
    for load in (MMGEMModel.from_pretrained, MMGEMConfig.from_pretrained, load_model):
        with pytest.raises(ValueError, match="no config.json"):
            load(folder)
    assert not built


@pytest.mark.parametrize(
    "damage, match",
    [
        ({"config.json": "{not json"}, r"config.json is not a readable JSON"),
        ({"config.json": json.dumps({"model_type": "llama"})}, "model_type 'llama'"),
        ({"tokenizer.json": None}, "has no tokenizer"),
    ],
)
def test_damaged_folders_name_the_problem(saved, tmp_path, damage, match):
    folder = copy_of(saved, tmp_path)
    for name, content in damage.items():
        if content is None:
            (folder / name).unlink()
        else:
            (folder / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        check_model_folder(folder)
    with pytest.raises(ValueError, match=match):
        load_model(folder)


def test_wrong_model_type_refused_by_the_hub_config_class(saved, tmp_path):
    from modeling_mmgem.configuration_mmgem import MMGEMConfig

    folder = copy_of(saved, tmp_path)
    edit_json(folder / "config.json", model_type="llama")
    with pytest.raises(ValueError, match="not an MM-GEM model"):
        MMGEMConfig.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------- 7. token ids
def test_config_and_tokenizer_must_agree(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    ordinary = 10  # an ordinary BPE token of the tiny tokenizer
    edit_json(folder / "config.json", emb_token_id=ordinary)
    with pytest.raises(ValueError, match=rf"emb_token_id` is 10 .*\[EMB\] is {config['emb_token_id']}"):
        load_model(folder)


@pytest.mark.parametrize("name, value", [("eos_token_id", 99999), ("pad_token_id", 5000), ("bos_token_id", -1)])
def test_text_config_ids_outside_the_vocabulary(saved, tmp_path, name, value):
    from modeling_mmgem.modeling_mmgem import MMGEMModel

    folder = copy_of(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"][name] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"text_config.{name}"):
        MMGEMModel.from_pretrained(folder)


def test_loaded_model_matches_the_saved_one(saved):
    from modeling_mmgem.modeling_mmgem import MMGEMModel

    model, processor = load_model(saved)
    reference = MMGEMModel.from_pretrained(saved)
    inputs = processor(text=["a red circle"])
    with torch.no_grad():
        assert torch.equal(
            model.get_text_features(**inputs).pooler_output, reference.get_text_features(**inputs).pooler_output
        )


# ---------------------------------------------------------------------------------------------- 10. collection
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_suite_collects_with_the_dev_extra_only(tmp_path):
    """`pip install -e '.[dev]'` must collect every test module: the collection runs with every optional extra's
    module (notebooks, onnx, mteb, data, eval, search, bench, app) unimportable; a test module that needs one skips
    with `pytest.importorskip` naming the extra, or imports it inside the test."""
    result = collect_without_extras(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "error" not in result.stdout.lower().split("\n")[-2], result.stdout[-2000:]


# ---------------------------------------------------------------------------------------------- 11/12. the audit
def test_the_audit_data_area_behaves_well(tmp_path):
    """The data area of `python -m tests.audit_inputs` (hostile entries in every format, paths outside the data
    root, the tar member cap), run as the audit runs it: every case behaves well."""
    audit = Audit()
    audit_data_formats(audit, tmp_path)
    assert len(audit.rows) >= 38 and all(good for _, _, good, _ in audit.rows), audit.table()


# ---------------------------------------------------------------------------------------------- 3. URLs
@pytest.fixture()
def silent_server():
    """An HTTP 'server' on 127.0.0.1 that accepts connections and never answers; yields its URL."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield f"http://127.0.0.1:{server.getsockname()[1]}/cat.png"
    server.close()


@pytest.fixture()
def endless_server():
    """An HTTP server on 127.0.0.1 that answers every request with an endless body; yields its URL."""
    import http.server
    import threading

    class Endless(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/big.png"
    server.shutdown()


def test_url_download_is_bounded_in_time(tiny, silent_server, monkeypatch):
    import time

    _, processor = tiny
    monkeypatch.setenv("MMGEM_IMAGE_URL_TIMEOUT", "1")
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"`images\[0\]`.*(timed out|took more than)"):
        processor(images=[silent_server])
    assert time.monotonic() - start < 10


def test_url_download_is_bounded_in_size(tiny, endless_server, monkeypatch):
    _, processor = tiny
    monkeypatch.setenv("MMGEM_MAX_IMAGE_BYTES", "1000000")
    with pytest.raises(ValueError, match=r"`images\[0\]`.*more than 1,000,000 bytes"):
        processor(images=[endless_server])


# ---------------------------------------------------------------------------------------------- 4. records
def write_record_file(folder: Path, records: list[dict]) -> Path:
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture()
def data_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (32, 32), "red").save(folder / "good.png")
    full = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "bomb.png").write_bytes(png_claiming(20_000, 20_000))
    outside = tmp_path / "outside.png"
    Image.new("RGB", (32, 32), "blue").save(outside)
    (folder / "link.png").symlink_to(outside)
    return folder


@pytest.mark.parametrize(
    "image, match",
    [
        ("truncated.png", "cannot read image .*truncated"),
        ("bomb.png", "20000x20000 = 400,000,000 pixels"),
        ("../outside.png", "leads outside the data folder"),
        ("link.png", "leads outside the data folder"),
        ("ABSOLUTE", "leads outside the data folder"),
    ],
)
def test_bad_records_are_found_at_load(data_folder, image, match):
    from mmgem.data.records import load_jsonl_records

    image = str(data_folder.parent / "outside.png") if image == "ABSOLUTE" else image
    path = write_record_file(data_folder, [{"image": "good.png", "caption": "a"}, {"image": image, "caption": "b"}])
    with pytest.raises(ValueError, match=rf"line 2: .*{match}"):
        load_jsonl_records(path)
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        assert [r.caption for r in load_jsonl_records(path, on_error="skip")] == ["a"]


def test_outside_paths_with_the_flag(data_folder):
    from mmgem.data.records import load_jsonl_records

    path = write_record_file(data_folder, [{"image": "../outside.png", "caption": "a"}])
    assert len(load_jsonl_records(path, allow_outside_data_root=True)) == 1


def test_control_tokens_in_captions_stay_text_through_training(tiny):
    from PIL import Image

    model, processor = tiny
    image = Image.new("RGB", (32, 32), "red")
    batch = processor(images=[image, image], text=["a red <image> [EMB]", "</s> [CAP] <pad>"])
    config = model.config
    k = config.num_image_tokens
    assert ((batch["input_ids"] == config.image_token_id).sum(dim=1) == k).all()
    assert ((batch["text_input_ids"] == config.emb_token_id).sum(dim=1) == 1).all()
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


# ---------------------------------------------------------------------------------------------- 5. caps
def test_caps_on_pixels_aspect_ratio_and_boxes(tiny, monkeypatch):
    import numpy as np
    from PIL import Image

    model, processor = tiny
    with pytest.raises(ValueError, match=r"`images\[0\]` is 100000x1 pixels, an aspect ratio above"):
        processor(images=[np.zeros((1, 100_000), dtype=np.uint8)])
    monkeypatch.setenv("MMGEM_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(ValueError, match=r"`images\[0\]` has 40x40 = 1,600 pixels, more than the 1,000"):
        processor(images=[Image.new("RGB", (40, 40))])
    monkeypatch.delenv("MMGEM_MAX_IMAGE_PIXELS")
    monkeypatch.setenv("MMGEM_MAX_BOXES_PER_IMAGE", "3")
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match=r"`boxes\[0\]`.*4 boxes, more than the 3 allowed"):
        processor(images=[image], boxes=[[[0, 0, 8, 8]] * 4])
    pixel_values = processor(images=[image])["pixel_values"]
    with pytest.raises(ValueError, match=r"`boxes`.*4 boxes, more than the 3 allowed"):
        model.get_image_features(pixel_values=pixel_values, boxes=[torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 4)])


# ---------------------------------------------------------------------------------------------- 6. model ids
def test_caption_ids_outside_the_vocabulary_are_refused_by_name(tiny):
    model, processor = tiny
    batch = processor(images=[Image.new("RGB", (32, 32))], text=["a red circle"])
    vocab_size = model.config.text_config.vocab_size
    batch["input_ids"][0, -1] = vocab_size
    with torch.no_grad(), pytest.raises(ValueError, match=rf"`input_ids` holds token ids in \[.*, {vocab_size}\]"):
        model(**batch)
    with torch.no_grad(), pytest.raises(ValueError, match="`input_ids`"):
        model.generate(input_ids=torch.tensor([[1, -4]]), max_new_tokens=2)
