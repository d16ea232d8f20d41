"""The app and the index against hostile or changed input: pixel cap before anything decodes an upload, a session keeps
thumbnails only, a cap on zero-shot labels, the stored frame of EXIF-rotated photos everywhere, a missing indexed file
shown as such, shard members named `./x`, a shard's member table read once, images edited in place re-embedded, and
(with a server) the upload size limit and the deletion of uploads."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("faiss", reason="the index needs the search extra (pip install 'mmgem[search]')")
gr = pytest.importorskip("gradio", reason="the app needs the app extra (pip install 'mmgem[app]')")

from mmgem.app import space_app  # noqa: E402
from mmgem.app.gradio_app import index_search_functions  # noqa: E402
from mmgem.search import ImageSearch, VectorStore, index_images  # noqa: E402
from mmgem.search import sources as sources_module  # noqa: E402
from mmgem.search.sources import load_image  # noqa: E402
from modeling_mmgem.image_loading_mmgem import load_rgb_image  # noqa: E402
from tests.audit_inputs import png_claiming  # noqa: E402
from tests.search_helpers import draw_images, readable_tiny_mmgem, save_model  # noqa: E402

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def tools():
    model, processor = readable_tiny_mmgem()
    return space_app.MMGEMTools(model, processor)


def build(tools, images, output, **kwargs):
    return index_images(tools.model, tools.processor, str(images), output, model_name="tiny", progress=False, **kwargs)


def rotated_jpeg(path: Path) -> Path:
    """A 64x40 photo stored landscape with EXIF orientation 6 (a viewer shows it rotated, 40x64)."""
    image = Image.new("RGB", (64, 40), (20, 120, 220))
    image.paste((250, 30, 30), (0, 0, 32, 20))
    exif = Image.Exif()
    exif[space_app.EXIF_ORIENTATION] = 6
    image.save(path, exif=exif, quality=95)
    return path


# ------------------------------------------------------------------------------------------------ uploads
def test_the_page_reads_uploads_with_the_models_loader(tools):
    assert space_app.image_loader(tools.processor) is load_rgb_image  # caps, stored frame


def test_an_upload_over_the_pixel_cap_is_refused_before_decoding(tools, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(12_000, 12_000))  # 144 MP claimed by a 70-byte file
    with pytest.raises(gr.Error, match="bomb.png cannot be read as an image.*pixels"):
        space_app.read_upload(load_rgb_image, str(bomb))
    with pytest.raises(gr.Error, match="pixels"):
        space_app.frame_of_the_model(load_rgb_image, str(bomb))


def test_a_session_keeps_thumbnails_not_images(tools, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 1200, 3), dtype=np.uint8)).save(big)
    state = space_app.UploadedCollection(tools).add([str(big)])
    assert max(state["images"][0].size) <= space_app.THUMBNAIL_SIDE
    np.testing.assert_allclose(state["vectors"][0], tools.embed_image(load_rgb_image(str(big))), atol=1e-6)
    with pytest.raises(gr.Error, match="at most"):
        space_app.UploadedCollection(tools).add([str(big)] * (space_app.MAX_UPLOADED_IMAGES + 1))


def test_zero_shot_labels_are_capped_before_any_work(tools):
    assert space_app.parse_labels("cat, dog") == ["cat", "dog"]
    started = time.perf_counter()
    with pytest.raises(gr.Error, match=f"at most {space_app.MAX_LABELS} labels"):
        space_app.parse_labels(", ".join(f"label{i}" for i in range(20_000)))
    assert time.perf_counter() - started < 0.5
    with pytest.raises(gr.Error, match="characters"):
        space_app.parse_labels("cat, " + "d" * 1000)


def test_an_exif_rotated_upload_is_shown_and_searched_in_the_indexs_frame(tools, tmp_path):
    photos = tmp_path / "photos"
    draw_images(photos, 3)
    photo = rotated_jpeg(photos / "rotated.jpg")
    build(tools, photos, tmp_path / "index", region_grids=[2])
    upload = tmp_path / "upload.jpg"
    upload.write_bytes(photo.read_bytes())
    shown = space_app.frame_of_the_model(load_rgb_image, str(upload))
    assert shown != str(upload) and not upload.exists()
    with Image.open(shown) as image:
        assert image.size == (64, 40) and image.getexif().get(space_app.EXIF_ORIENTATION) is None
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(load_image(str(photo))))
    # A box clicked on what the page shows is a box of the index's frame: the indexed cell is found exactly.
    _, search_region = index_search_functions(ImageSearch(tmp_path / "index", tools.model, tools.processor))
    search = ImageSearch(tmp_path / "index", tools.model, tools.processor)
    cell = next(i["box"] for i in search.store.items if i["path"] == str(photo) and i["kind"] == "region")
    hits = search.image(load_rgb_image(shown), region=cell, k=1)
    assert hits[0].path == str(photo) and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert search_region(load_rgb_image(shown), cell, 1)[0][1].startswith("rotated.jpg  1.000")
    plain = photos / "shape_0.png"
    assert space_app.frame_of_the_model(load_rgb_image, str(plain)) == str(plain)  # no EXIF: kept as uploaded


# ------------------------------------------------------------------------------------------------ index hits
def test_a_missing_indexed_file_is_one_grey_tile_with_a_message(tools, tmp_path):
    photos = tmp_path / "photos"
    draw_images(photos, 4)
    build(tools, photos, tmp_path / "index", region_grids=[2])
    (photos / "shape_1.png").unlink()
    search_text, search_region = index_search_functions(ImageSearch(tmp_path / "index", tools.model, tools.processor))
    gallery = search_text("a blue square", 4, 0.0)
    labels = [label for _, label in gallery]
    assert len(gallery) == 4 and sum("cannot be shown: file not found" in label for label in labels) == 1
    assert next(label for label in labels if label.startswith("shape_1.png")).endswith("file not found)")
    matches = search_region(load_image(str(photos / "shape_2.png")), (0, 0, 32, 32), 4)
    assert len(matches) == 4


def test_shard_members_named_dot_slash_and_one_table_read_per_shard(tools, tmp_path):
    photos = tmp_path / "samples"
    paths = draw_images(photos, 3)
    for i, path in enumerate(paths):
        path.rename(photos / f"sample{i}.png")
    shard = tmp_path / "x.tar"
    subprocess.run(["tar", "-C", str(photos), "-cf", str(shard), "."], check=True)  # members ./sample0.png ...
    build(tools, shard, tmp_path / "index", region_grids=[])
    keys = sorted(VectorStore(tmp_path / "index").paths())
    assert len(keys) == 3
    sources_module._shard_members.cache_clear()
    for key in keys * 2:
        name = key.split("#")[1].removeprefix("./")
        assert np.array_equal(np.asarray(load_image(key)), np.asarray(load_image(str(photos / name))))
    assert sources_module._shard_members.cache_info().misses == 1  # the tar's member table is read once
    shard.write_bytes(shard.read_bytes())  # rewritten in place: read again
    load_image(keys[0])
    search_text, _ = index_search_functions(ImageSearch(tmp_path / "index", tools.model, tools.processor))
    assert all("cannot be shown" not in label for _, label in search_text("a red circle", 3, 0.0))


def test_an_image_edited_in_place_is_embedded_again(tools, tmp_path):
    photos = tmp_path / "photos"
    draw_images(photos, 3)
    build(tools, photos, tmp_path / "index", region_grids=[2])
    edited = photos / "shape_1.png"
    draw_images(tmp_path / "other", 5)
    edited.write_bytes((tmp_path / "other" / "shape_4.png").read_bytes())  # same name, new picture
    summary = build(tools, photos, tmp_path / "index", region_grids=[2])
    assert (summary["reembedded"], summary["added"], summary["skipped"]) == (1, 1, 2)
    store = VectorStore(tmp_path / "index")
    assert store.count("image") == 3 and len(store.items) == 3 * 5
    row = next(r for r, i in enumerate(store.items) if i["path"] == str(edited) and i["kind"] == "image")
    np.testing.assert_allclose(store.vectors[row], tools.embed_image(load_image(str(edited))), atol=1e-5)
    assert build(tools, photos, tmp_path / "index", region_grids=[2])["reembedded"] == 0


# ------------------------------------------------------------------------------------------------ the server
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_server_caps_upload_size_and_deletes_uploads(tmp_path):
    from tests.test_app import start_server, stop

    model_dir = save_model(*readable_tiny_mmgem(), tmp_path / "model")
    temp = tmp_path / "gradio-temp"
    repo = str(Path(__file__).resolve().parents[1])
    argv = [
        sys.executable,
        "-m",
        "mmgem.cli",
        "app",
        "--model",
        str(model_dir),
        "--port",
        "{port}",
        "--max-upload-mb",
        "1",
    ]
    process, url = start_server(
        argv, cwd=tmp_path, env_extra={"PYTHONPATH": repo, "GRADIO_TEMP_DIR": str(temp), "MMGEM_APP_UPLOAD_TTL_S": "2"}
    )
    try:

        def upload(size: int) -> int:
            boundary = uuid.uuid4().hex
            body = (
                (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n'
                    "Content-Type: image/png\r\n\r\n"
                ).encode()
                + b"\0" * size
                + f"\r\n--{boundary}--\r\n".encode()
            )
            request = urllib.request.Request(
                url + "gradio_api/upload",
                data=body,
                method="POST",
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status
            except urllib.error.HTTPError as error:
                return error.code

        assert upload(3 * 2**20) == 413  # over --max-upload-mb: refused
        assert upload(1000) == 200
        uploaded = [p for p in temp.rglob("x.png")]
        assert uploaded, list(temp.rglob("*"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(p.exists() for p in uploaded):
            time.sleep(0.5)
        assert not any(p.exists() for p in uploaded), "uploads are deleted after MMGEM_APP_UPLOAD_TTL_S"
        from gradio_client import Client, handle_file

        client = Client(url, verbose=False)
        photo = draw_images(tmp_path / "photos", 1)[0]
        with pytest.raises(Exception, match="at most 64 labels"):
            client.predict(handle_file(str(photo)), ", ".join(f"l{i}" for i in range(20_000)), api_name="/describe")
        with pytest.raises(Exception, match="at most 1000 characters"):
            client.predict("a red circle " * 1000, 3, 0.5, api_name="/search")
        caption, _ = client.predict(handle_file(str(photo)), "", api_name="/describe")  # and it still works
        assert isinstance(caption, str)
    finally:
        stop(process)


def test_a_shard_rewritten_with_new_content_is_embedded_again(tools, tmp_path):
    import tarfile

    drawn = draw_images(tmp_path / "drawn", 4)
    shard = tmp_path / "part.tar"

    def write_shard(pictures):
        with tarfile.open(shard, "w") as tar:
            for i, picture in enumerate(pictures):
                tar.add(picture, arcname=f"sample{i}.png")

    write_shard(drawn[:3])
    build(tools, shard, tmp_path / "index", region_grids=[])
    write_shard([drawn[0], drawn[3], drawn[2]])  # sample1 now holds another picture
    summary = build(tools, shard, tmp_path / "index", region_grids=[])
    assert (summary["reembedded"], summary["added"]) == (1, 1)
    store = VectorStore(tmp_path / "index")
    assert store.count("image") == 3
    row = next(r for r, i in enumerate(store.items) if i["path"].endswith("#sample1.png"))
    np.testing.assert_allclose(store.vectors[row], tools.embed_image(load_image(str(drawn[3]))), atol=1e-5)
    assert build(tools, shard, tmp_path / "index", region_grids=[])["added"] == 0
