"""Try an MM-GEM in the browser: captions, zero-shot labels, region captions and search, in one Gradio page.

This file is self-contained (torch, transformers, gradio, PIL, numpy), so that it also runs as the `app.py` of an
exported model folder, for example as a Hugging Face Space next to the weights::

    python app.py                      # in the exported folder: loads "." with trust_remote_code
    MMGEM_MODEL=you/mmgem python app.py

`mmgem app --model M [--index INDEX]` builds the same page with the installed mmgem and, with an index, searches it.
Without an index the Search tab ranks the images the user uploads there (exact cosine, in memory).

Tabs:
- Image: upload an image -> its caption; type labels (comma-separated) -> zero-shot probabilities. Click two corners
  on the image (or type x0,y0,x1,y1) -> the region's caption, the box drawn, and the images whose regions match it.
- Search: type a text -> a gallery of the best matches.

Limits (the page is meant to be shared): an upload may have at most `MMGEM_APP_MAX_UPLOAD_MB` megabytes (default 20)
and the model's pixel cap (`MMGEM_MAX_IMAGE_PIXELS`, checked from the file header before anything decodes it); uploads
are deleted `MMGEM_APP_UPLOAD_TTL_S` seconds (default 3600) after they arrive; a session keeps only the path of its
query image and small thumbnails of the images it searches, not decoded full-size images; zero-shot takes at most
`MAX_LABELS` labels. Images are read as the index reads them (the pixels as stored, no EXIF rotation): an upload
with an EXIF orientation is shown in that frame, so that the boxes drawn on it are the boxes the model sees.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the app must work offline

from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

GalleryItems = list[tuple[Image.Image, str]]
# search_text(query, k, caption_weight) and search_region(image, box, k) -> gallery items (image, label)
TextSearch = Callable[[str, int, float], GalleryItems]
RegionSearch = Callable[[Image.Image, Sequence[float], int], GalleryItems]
BOX_COLOUR = (255, 40, 40)
MAX_LABELS = 64  # zero-shot labels in one request: each is a text forward, and the page has a single queue
MAX_LABEL_CHARS = 200
MAX_LABELS_TEXT_CHARS = MAX_LABELS * (MAX_LABEL_CHARS + 2)
MAX_QUERY_CHARS = 1000  # a search text (the tokenizer reads all of it before truncating)
MAX_UPLOADED_IMAGES = 256  # images one session may search without an index
THUMBNAIL_SIDE = 256  # what a session keeps of each image it searches (the vectors are computed at full size)
FALLBACK_MAX_PIXELS = 64_000_000  # the pixel cap when the processor's module has no loader of its own
EXIF_ORIENTATION = 274


def _env_number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def max_upload_bytes() -> int:
    return int(_env_number("MMGEM_APP_MAX_UPLOAD_MB", 20) * 2**20)


def upload_ttl_s() -> int:
    return max(1, int(_env_number("MMGEM_APP_UPLOAD_TTL_S", 3600)))


def _capped_open(path: str) -> Image.Image:
    """Open an image file, refusing more than FALLBACK_MAX_PIXELS from its header (before decoding)."""
    with Image.open(path) as image:
        if image.width * image.height > FALLBACK_MAX_PIXELS:
            raise ValueError(
                f"{os.path.basename(path)} has {image.width}x{image.height} pixels, more than "
                f"{FALLBACK_MAX_PIXELS:,}; resize it first."
            )
        return image.convert("RGB")


def image_loader(processor: Any) -> Callable[[str], Image.Image]:
    """The model's own image loader (`load_rgb_image` next to its processor class: pixel and byte caps checked
    before decoding, no EXIF rotation), so that the page reads images as the index and the processor do."""
    module = sys.modules.get(type(processor).__module__)
    loader = getattr(module, "load_rgb_image", None)
    return loader if callable(loader) else _capped_open


class MMGEMTools:
    """The model operations the page offers, on PIL images; every embedding is unit length."""

    def __init__(self, model: Any, processor: Any) -> None:
        self.model, self.processor = model.eval(), processor

    def _inputs(self, image: Image.Image, box: Sequence[float] | None) -> dict[str, Any]:
        boxes = [[list(box)]] if box is not None else None
        inputs = self.processor(images=[image.convert("RGB")], boxes=boxes)
        kwargs = {"pixel_values": inputs["pixel_values"].to(self.model.device)}
        if boxes is not None:
            kwargs["boxes"] = [b.to(self.model.device) for b in inputs["boxes"]]
        return kwargs

    @torch.no_grad()
    def caption(self, image: Image.Image, box: Sequence[float] | None = None) -> str:
        """The greedy caption of the image, or of one box of it (the model's generation defaults)."""
        generated = self.model.generate(**self._inputs(image, box), do_sample=False)
        return self.processor.decode_captions(generated)[0]

    @torch.no_grad()
    def embed_image(self, image: Image.Image, box: Sequence[float] | None = None) -> np.ndarray:
        features = self.model.get_image_features(**self._inputs(image, box)).pooler_output
        return F.normalize(features.float(), dim=-1)[0].cpu().numpy()  # [D]

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        inputs = self.processor(text=list(texts), truncation=True).to(self.model.device)
        return F.normalize(self.model.get_text_features(**inputs).pooler_output.float(), dim=-1).cpu().numpy()

    def zero_shot(self, image: Image.Image, labels: Sequence[str]) -> dict[str, float]:
        """Probabilities over `labels`: softmax of the model's scaled cosines between the image and "a photo of a X"."""
        image_vector = self.embed_image(image)
        text_vectors = self.embed_texts([f"a photo of a {label}" for label in labels])  # [L, D]
        scale = float(self.model.logit_scale().detach())  # the trained temperature (exp of the clamped log scale)
        probabilities = torch.softmax(torch.from_numpy(text_vectors @ image_vector) * scale, dim=0)
        return {label: float(p) for label, p in zip(labels, probabilities)}


# ------------------------------------------------------------------------------------------------ input parsing
def parse_labels(text: str | None) -> list[str]:
    if len(text or "") > MAX_LABELS_TEXT_CHARS:
        raise gr.Error(f"Labels: at most {MAX_LABELS} labels of at most {MAX_LABEL_CHARS} characters.")
    labels = [part.strip() for part in (text or "").split(",", MAX_LABELS + 1) if part.strip()]
    if len(labels) < 2:
        raise gr.Error("Labels: type at least two labels, separated by commas (e.g. cat, dog, car).")
    if len(labels) > MAX_LABELS:
        raise gr.Error(f"Labels: at most {MAX_LABELS} labels at a time.")
    if any(len(label) > MAX_LABEL_CHARS for label in labels):
        raise gr.Error(f"Labels: each label may have at most {MAX_LABEL_CHARS} characters.")
    return labels


def parse_box(text: str | None, image: Image.Image) -> list[float]:
    """`x0,y0,x1,y1` in pixels of `image`, checked to lie inside it with a positive area."""
    try:
        box = [float(v) for v in (text or "").split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise gr.Error(f"Box: type x0,y0,x1,y1 (4 numbers, pixels) or click two corners on the image; got {text!r}.")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height):
        raise gr.Error(f"Box: {text} must lie inside the {image.width}x{image.height} image with x0 < x1, y0 < y1.")
    return box


def draw_box(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """A copy of `image` with `box` outlined."""
    copy = image.convert("RGB").copy()
    width = max(1, round(min(copy.size) / 64))
    ImageDraw.Draw(copy).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=BOX_COLOUR, width=width)
    return copy


def thumbnail(image: Image.Image, side: int = THUMBNAIL_SIDE) -> Image.Image:
    """A copy of `image` at most `side` pixels wide and high."""
    copy = image.copy()
    copy.thumbnail((side, side))
    return copy


def read_upload(load: Callable[[str], Image.Image], path: str | None, what: str = "Image") -> Image.Image:
    """The uploaded file at `path` read by the model's loader; a page error (not a crash) when it cannot be."""
    if path is None:
        raise gr.Error(f"{what}: upload an image first.")
    try:
        return load(path)
    except Exception as error:  # noqa: BLE001 - any unreadable upload is the user's to fix
        raise gr.Error(f"{what}: {os.path.basename(path)} cannot be read as an image ({error}).") from None


def frame_of_the_model(load: Callable[[str], Image.Image], path: str | None) -> str | None:
    """The upload as the model sees it: a file with an EXIF orientation (which a browser would show rotated) is
    replaced by a PNG of its stored pixels, so that clicked boxes and drawn boxes are in the model's frame."""
    if path is None:
        return None
    image = read_upload(load, path)  # also refuses an image over the pixel cap before anything keeps it
    with Image.open(path) as stored:
        orientation = stored.getexif().get(EXIF_ORIENTATION, 1)
    if orientation in (None, 1):
        return path
    shown = os.path.splitext(path)[0] + ".stored-frame.png"
    image.save(shown)
    os.unlink(path)
    return shown


# ------------------------------------------------------------------------------------------------ uploaded images
class UploadedCollection:
    """Search over images uploaded in the page: exact cosine over their embeddings (no index needed)."""

    def __init__(self, tools: MMGEMTools, load: Callable[[str], Image.Image] | None = None) -> None:
        self.tools = tools
        self.load = load or image_loader(tools.processor)

    def add(self, files: Sequence[Any] | None) -> dict[str, Any]:
        """Embed the uploaded files; the state keeps their names, vectors and thumbnails (not the images)."""
        paths = [getattr(f, "name", f) for f in files or []]
        if len(paths) > MAX_UPLOADED_IMAGES:
            raise gr.Error(f"Images to search: at most {MAX_UPLOADED_IMAGES} at a time; got {len(paths)}.")
        names, thumbnails, vectors = [], [], []
        for path in paths:
            image = read_upload(self.load, path, "Images to search")
            vectors.append(self.tools.embed_image(image))
            thumbnails.append(thumbnail(image))
            names.append(os.path.basename(path))
            del image  # one full-size image at a time
        return {"names": names, "images": thumbnails, "vectors": np.stack(vectors) if vectors else np.zeros((0, 1))}

    @staticmethod
    def rank(state: dict[str, Any] | None, vector: np.ndarray, k: int) -> GalleryItems:
        if not state or not state["images"]:
            raise gr.Error("Search: upload some images to search first (no index was given to this app).")
        scores = state["vectors"] @ vector
        order = np.argsort(-scores, kind="stable")[:k]
        return [(state["images"][i], f"{state['names'][i]}  {scores[i]:.3f}") for i in order]


# ------------------------------------------------------------------------------------------------ the page
def build_demo(
    model: Any,
    processor: Any,
    search_text: TextSearch | None = None,
    search_region: RegionSearch | None = None,
    title: str = "MM-GEM",
    default_labels: str = "cat, dog, car, person",
    load_image: Callable[[str], Image.Image] | None = None,
) -> gr.Blocks:
    """The Gradio page. With `search_text` / `search_region` (an index), searches go there; else to uploads.
    `load_image` reads uploads (default: the model's own loader, as the index reads its images)."""
    tools = MMGEMTools(model, processor)
    load = load_image or image_loader(processor)
    collection = UploadedCollection(tools, load)
    indexed = search_text is not None

    def describe(path: str | None, labels_text: str) -> tuple[str, dict[str, float] | None]:
        labels = parse_labels(labels_text) if (labels_text or "").strip() else None  # checked before any work
        image = read_upload(load, path)
        return tools.caption(image), (tools.zero_shot(image, labels) if labels else None)

    def region(path: str | None, box_text: str, k: float, uploaded: dict | None):
        image = read_upload(load, path)
        box = parse_box(box_text, image)
        if search_region is not None:
            matches = search_region(image, box, int(k))
        elif uploaded and uploaded["images"]:
            matches = collection.rank(uploaded, tools.embed_image(image, box), int(k))
        else:
            matches = []
        return tools.caption(image, box), draw_box(image, box), matches

    def search(query: str, k: float, caption_weight: float, uploaded: dict | None) -> GalleryItems:
        if not (query or "").strip():
            raise gr.Error("Search: type a text to search for.")
        if len(query) > MAX_QUERY_CHARS:
            raise gr.Error(f"Search: the text may have at most {MAX_QUERY_CHARS} characters.")
        if search_text is not None:
            return search_text(query.strip(), int(k), float(caption_weight))
        return collection.rank(uploaded, tools.embed_texts([query.strip()])[0], int(k))

    def corner(path: str | None, first: list | None, event: gr.SelectData):
        """Two clicks on the image: the first sets a corner, the second completes the box."""
        x, y = (int(v) for v in event.index)
        if not first:
            return [x, y], f"{x},{y},{x + 1},{y + 1}"
        x0, x1 = sorted((first[0], x))
        y0, y1 = sorted((first[1], y))
        return None, f"{x0},{y0},{max(x1, x0 + 1)},{max(y1, y0 + 1)}"

    ttl = upload_ttl_s()
    with gr.Blocks(title=title, delete_cache=(ttl, ttl)) as demo:
        gr.Markdown(f"# {title}\nCaptions, zero-shot labels, regions and search with one MM-GEM model.")
        uploaded = gr.State(None)
        with gr.Tab("Image"):
            with gr.Row():
                with gr.Column():
                    # A path, not a decoded image: gradio then only reads the header, and our loader (with its
                    # pixel cap) decodes the file when a button needs it.
                    image = gr.Image(
                        type="filepath",
                        image_mode=None,
                        label="Image (click two corners to draw a box)",
                        elem_id="query-image",
                    )
                    labels = gr.Textbox(
                        value=default_labels, label="Zero-shot labels (comma-separated)", elem_id="labels"
                    )
                    describe_button = gr.Button("Caption and labels", variant="primary", elem_id="describe")
                with gr.Column():
                    caption = gr.Textbox(label="Caption", elem_id="caption", interactive=False)
                    label_output = gr.Label(label="Zero-shot labels", elem_id="zero-shot")
            with gr.Row():
                with gr.Column():
                    box = gr.Textbox(label="Box x0,y0,x1,y1 (pixels)", placeholder="10,10,60,60", elem_id="box")
                    region_k = gr.Slider(1, 24, value=8, step=1, label="Matching images")
                    region_button = gr.Button("Caption the region and find it", elem_id="region-button")
                    region_caption = gr.Textbox(label="Region caption", elem_id="region-caption", interactive=False)
                with gr.Column():
                    region_preview = gr.Image(label="The box", interactive=False, elem_id="region-preview")
            region_gallery = gr.Gallery(label="Images whose regions match", columns=4, elem_id="region-gallery")
        with gr.Tab("Search"):
            query = gr.Textbox(label="Text", placeholder="a red car", elem_id="query", max_length=MAX_QUERY_CHARS)
            with gr.Row():
                k = gr.Slider(1, 48, value=12, step=1, label="Results")
                weight = gr.Slider(
                    0.0,
                    1.0,
                    value=0.5,
                    step=0.05,
                    visible=indexed,
                    elem_id="caption-weight",
                    label="Caption weight (0: image embedding only, 1: the model's captions only)",
                )
            files = gr.File(
                file_count="multiple",
                file_types=["image"],
                visible=not indexed,
                label="Images to search (no index given)",
            )
            search_button = gr.Button("Search", variant="primary", elem_id="search-button")
            gallery = gr.Gallery(label="Best matches", columns=4, elem_id="search-gallery")
        first_corner = gr.State(None)

        image.upload(lambda path: frame_of_the_model(load, path), image, image, api_visibility="private")
        image.select(corner, [image, first_corner], [first_corner, box], api_visibility="private")
        describe_button.click(describe, [image, labels], [caption, label_output], api_name="describe")
        region_button.click(
            region,
            [image, box, region_k, uploaded],
            [region_caption, region_preview, region_gallery],
            api_name="region",
        )
        files.change(collection.add, files, uploaded, api_visibility="private")
        search_button.click(search, [query, k, weight, uploaded], gallery, api_name="search")
        query.submit(search, [query, k, weight, uploaded], gallery, api_visibility="private")
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, **kwargs: Any) -> Any:
    """Serve the page locally: no share link, no server-side rendering (no Node), analytics off, uploads capped at
    `MMGEM_APP_MAX_UPLOAD_MB`."""
    kwargs.setdefault("max_file_size", max_upload_bytes())
    return demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, **kwargs)


def main() -> None:
    """`python app.py` in an exported folder (or a Space): the model in this folder, or $MMGEM_MODEL."""
    from transformers import AutoModel, AutoProcessor

    location = os.environ.get("MMGEM_MODEL", os.path.dirname(os.path.abspath(__file__)))
    model = AutoModel.from_pretrained(location, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(location, trust_remote_code=True)
    port = int(os.environ["GRADIO_SERVER_PORT"]) if "GRADIO_SERVER_PORT" in os.environ else None
    launch(
        build_demo(model, processor, title=os.path.basename(location.rstrip("/")) or "MM-GEM"),
        host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        port=port,
    )


if __name__ == "__main__":
    main()
