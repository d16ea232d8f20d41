"""The web app: `mmgem app` started as a user starts it, driven by gradio_client and by headless Debian Chromium.

The model is tiny and random (tests/search_helpers.py), so the expected answers are exact: the page must show the
caption the model writes in-process, a text query equal to an image's caption (caption weight 1) must rank that
image first, and a region query with one of the indexed grid boxes must find that box of that image.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from mmgem.search import index_images
from mmgem.search.sources import load_image
from tests.search_helpers import draw_images, readable_tiny_mmgem, save_model

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT_ENV = "MMGEM_APP_SCREENSHOT_DIR"  # where to also save the screenshots (the README's come from here)
TARGET = "shape_2.png"
REGION_BOX = (32, 0, 64, 32)  # one cell of the index's 2x2 grid on the 64 px images

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(process: subprocess.Popen, url: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "config", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the app did not answer at {url} within {timeout:.0f} s")


def start_server(argv: list[str], cwd: Path, env_extra: dict[str, str] | None = None):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        GRADIO_ANALYTICS_ENABLED="False",
        **(env_extra or {}),
    )
    argv = [a.replace("{port}", str(port)) for a in argv]
    if "GRADIO_SERVER_PORT" in (env_extra or {}):
        env["GRADIO_SERVER_PORT"] = str(port)
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(process, url)
    except BaseException:
        process.kill()
        raise
    return process, url


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny model, 6 drawn images, their index (captions, 2x2 regions) and the in-process answers."""
    root = tmp_path_factory.mktemp("app")
    model, processor = readable_tiny_mmgem()
    save_model(model, processor, root / "model")
    draw_images(root / "photos", 6)
    index_images(
        model,
        processor,
        str(root / "photos"),
        root / "index",
        model_name=str(root / "model"),
        captions=True,
        region_grids=[2],
        progress=False,
    )
    from mmgem.app.space_app import MMGEMTools

    tools = MMGEMTools(model, processor)
    target = load_image(str(root / "photos" / TARGET))
    captions = {p.name: tools.caption(load_image(str(p))) for p in sorted((root / "photos").glob("*.png"))}
    assert list(captions.values()).count(captions[TARGET]) == 1, "the target's caption must single it out"
    return {
        "root": root,
        "tools": tools,
        "caption": captions[TARGET],
        "region_caption": tools.caption(target, REGION_BOX),
        "zero_shot": tools.zero_shot(target, ["red circle", "green triangle"]),
    }


@pytest.fixture(scope="module")
def server(setup):
    root = setup["root"]
    argv = [
        sys.executable,
        "-m",
        "mmgem.cli",
        "app",
        "--model",
        str(root / "model"),
        "--index",
        str(root / "index"),
        "--port",
        "{port}",
    ]
    process, url = start_server(argv, cwd=root, env_extra={"PYTHONPATH": str(REPO)})
    yield url
    stop(process)


def gallery_names(gallery) -> list[str]:
    return [item["caption"].split()[0] for item in gallery]


def test_gradio_client_endpoints(server, setup):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    target = str(setup["root"] / "photos" / TARGET)
    caption, labels = client.predict(handle_file(target), "red circle, green triangle", api_name="/describe")
    assert caption == setup["caption"]
    probabilities = {c["label"]: c["confidence"] for c in labels["confidences"]}
    assert probabilities == pytest.approx(setup["zero_shot"], abs=1e-5)
    gallery = client.predict(setup["caption"], 3, 1.0, api_name="/search")
    assert gallery_names(gallery)[0] == TARGET and len(gallery) == 3
    region_caption, preview, matches = client.predict(
        handle_file(target), ",".join(map(str, REGION_BOX)), 4, api_name="/region"
    )
    assert region_caption == setup["region_caption"]
    assert gallery_names(matches)[0] == TARGET and matches[0]["caption"].endswith("1.000")
    assert Image.open(preview).size == (64, 64)
    with pytest.raises(Exception, match="Box"):
        client.predict(handle_file(target), "1,2,3", 4, api_name="/region")


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get(SCREENSHOT_ENV):
        Path(os.environ[SCREENSHOT_ENV]).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(os.environ[SCREENSHOT_ENV]) / name)
    assert path.stat().st_size > 10_000
    return path


def test_in_a_real_browser(server, setup, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (make test installs it)")
    from playwright.sync_api import expect, sync_playwright

    external = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})

        def offline(route):  # the page must work with no network beyond the app itself
            if route.request.url.startswith(server):
                route.continue_()
            else:
                external.append(route.request.url)
                route.abort()

        page.route("**/*", offline)
        page.goto(server)
        # Image tab: upload, caption and zero-shot labels.
        page.locator("#query-image input[type=file]").set_input_files(str(setup["root"] / "photos" / TARGET))
        page.locator("#labels textarea").fill("red circle, green triangle")
        page.locator("#describe").click()
        caption_box = page.locator("#caption textarea")
        expect(caption_box).not_to_have_value("", timeout=60_000)
        assert caption_box.input_value() == setup["caption"]
        best_label = max(setup["zero_shot"], key=setup["zero_shot"].get)
        expect(page.locator("#zero-shot")).to_contain_text(best_label, timeout=30_000)
        # A typed box: the region's caption and the images whose regions match.
        page.locator("#box textarea").fill(",".join(map(str, REGION_BOX)))
        page.locator("#region-button").click()
        expect(page.locator("#region-caption textarea")).to_have_value(setup["region_caption"], timeout=60_000)
        expect(page.locator("#region-gallery")).to_contain_text(TARGET, timeout=30_000)
        _screenshot(page, tmp_path, "app-image.png")
        # Search tab: the target's caption finds the target first (captions only: weight 1).
        page.get_by_role("tab", name="Search").click()
        page.locator("#query textarea").fill(setup["caption"])
        weight = page.locator("#caption-weight input[type=number]")
        weight.fill("1")
        weight.press("Enter")
        page.locator("#search-button").click()
        gallery = page.locator("#search-gallery")
        expect(gallery).to_contain_text(TARGET, timeout=60_000)
        names = re.findall(r"shape_\d+\.png", gallery.inner_text())
        assert names[0] == TARGET and len(names) == len(set(names)) == 6
        _screenshot(page, tmp_path, "app-search.png")
        browser.close()
    assert external == [], f"the page asked for outside resources: {external}"


def test_exported_folder_runs_as_a_space_without_mmgem(setup, tmp_path):
    """The `app.py` publish writes runs in the exported folder with mmgem and modeling_mmgem unimportable."""
    from mmgem.conversion.publish import CardInfo, build_model_card, write_folder
    from modeling_mmgem.modeling_mmgem import MMGEMModel
    from modeling_mmgem.processing_mmgem import MMGEMProcessor

    model_dir = setup["root"] / "model"
    model, processor = MMGEMModel.from_pretrained(model_dir), MMGEMProcessor.from_pretrained(model_dir)
    export = tmp_path / "export"
    export.mkdir()
    write_folder(model, processor, export, build_model_card(model, CardInfo(), "tiny-mmgem"), "5GB")
    source = (export / "app.py").read_text()
    imported = {n.names[0].name.split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import)}
    imported |= {n.module.split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    assert imported <= {
        "__future__",
        "os",
        "sys",
        "collections",
        "typing",
        "gradio",
        "numpy",
        "torch",
        "PIL",
        "transformers",
    }
    assert "gradio" in (export / "requirements.txt").read_text()
    card = (export / "README.md").read_text()
    assert "sdk: gradio" in card and "app_file: app.py" in card
    # Run it as a Space runs it, with imports of the project refused.
    runner = (
        "import runpy, sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, *args):\n"
        "        if name.split('.')[0] in ('mmgem', 'modeling_mmgem'):\n"
        "            raise ImportError(f'{name} must not be needed')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "runpy.run_path('app.py', run_name='__main__')\n"
    )
    process, url = start_server([sys.executable, "-c", runner], cwd=export, env_extra={"GRADIO_SERVER_PORT": "0"})
    try:
        from gradio_client import Client, handle_file

        client = Client(url, verbose=False)
        caption, _ = client.predict(handle_file(str(setup["root"] / "photos" / TARGET)), "", api_name="/describe")
        assert caption == setup["caption"]
        # Without an index, the search tab ranks uploaded images: not exposed in the API (a state), so the
        # in-memory ranking is checked directly.
    finally:
        stop(process)
    from mmgem.app.space_app import UploadedCollection

    paths = sorted(str(p) for p in (setup["root"] / "photos").glob("*.png"))
    state = UploadedCollection(setup["tools"]).add(paths)
    ranked = UploadedCollection.rank(state, setup["tools"].embed_image(load_image(paths[3])), 2)
    assert ranked[0][1].startswith(Path(paths[3]).name) and ranked[0][1].endswith("1.000")
