"""Writers of small fixtures in the published layouts of the data formats and benchmarks (for the tests).

Each image is black with one white rectangle at a known place, so a test can check that the box reaching the model
is exactly the drawn shape: `shape_image(size, box).getbbox() == box`.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = (64, 48)


def shape_image(size: tuple[int, int] = SIZE, box: tuple[int, int, int, int] = (8, 4, 40, 30), grey: int = 0):
    """A black (or `grey`) RGB image with a white rectangle covering exactly `box` (x0, y0, x1, y1 exclusive)."""
    image = Image.new("RGB", size, (grey, grey, grey))
    ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(255, 255, 255))
    return image


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def white_box(image: Image.Image) -> tuple[int, int, int, int]:
    """The bounding box of the white pixels (what the drawn shape covers)."""
    return image.convert("L").point(lambda v: 255 if v > 200 else 0).getbbox()


def write_shards(folder: Path, samples: list[dict], per_shard: int) -> list[Path]:
    """img2dataset's layout: `00000.tar`, ... with `<key>.png|jpg`, `<key>.txt`, `<key>.json` per sample.

    A sample is `{"image": bytes, "ext": "png", "caption": str | None, "json": dict}`.
    """
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(samples), per_shard):
        path = folder / f"{start // per_shard:05d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for offset, sample in enumerate(samples[start : start + per_shard]):
                key = f"{start // per_shard:05d}{offset:04d}"
                record = {"__key__": key, sample.get("ext", "png"): sample["image"]}
                if sample.get("caption") is not None:
                    record["txt"] = sample["caption"]
                record["json"] = json.dumps({"key": key, **sample.get("json", {})}).encode()
                writer.write(record)
        paths.append(path)
    return paths


def write_llava(folder: Path, entries: list[tuple[str, Image.Image | None, str]]) -> Path:
    """A LLaVA / ShareGPT4V JSON (`images/<name>`); an entry without an image names a missing file."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (name, image, caption) in enumerate(entries):
        if image is not None:
            image.save(folder / "images" / name)
        rows.append(
            {
                "id": f"{index:06d}",
                "image": f"images/{name}",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe this image in detail."},
                    {"from": "gpt", "value": caption},
                    {"from": "human", "value": "And the colour?"},
                    {"from": "gpt", "value": "white"},
                ],
            }
        )
    path = folder / "sharegpt4v.json"
    path.write_text(json.dumps(rows))
    return path


def write_karpathy(folder: Path, dataset: str, entries: list[tuple[str, Image.Image, str, list[str]]]) -> Path:
    """`dataset_coco.json` (images under `val2014/`) or `dataset_flickr30k.json` (under `flickr30k-images/`)."""
    subfolder = "val2014" if dataset == "coco" else "flickr30k-images"
    (folder / subfolder).mkdir(parents=True, exist_ok=True)
    images = []
    for index, (name, image, split, sentences) in enumerate(entries):
        image.save(folder / subfolder / name)
        entry = {
            "filename": name,
            "imgid": index,
            "split": split,
            "sentids": list(range(5 * index, 5 * index + 5)),
            "sentences": [{"raw": s, "tokens": s.lower().split(), "imgid": index} for s in sentences],
        }
        if dataset == "coco":
            entry.update(filepath=subfolder, cocoid=1000 + index)
        images.append(entry)
    path = folder / f"dataset_{'coco' if dataset == 'coco' else 'flickr30k'}.json"
    path.write_text(json.dumps({"images": images, "dataset": dataset}))
    return path


def write_coco_captions(folder: Path, entries: list[tuple[str, Image.Image, list[str]]]) -> Path:
    """`annotations/captions_train2017.json` with images under `train2017/`."""
    (folder / "train2017").mkdir(parents=True, exist_ok=True)
    (folder / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for index, (name, image, captions) in enumerate(entries):
        image.save(folder / "train2017" / name)
        images.append({"id": 10 + index, "file_name": name, "width": image.width, "height": image.height})
        first = len(annotations)
        annotations += [{"id": first + k, "image_id": 10 + index, "caption": c} for k, c in enumerate(captions)]
    path = folder / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return path


def write_visual_genome(folder: Path, entries: list[tuple[int, Image.Image, list[tuple[list[float], str]]]]) -> Path:
    """`region_descriptions.json` with boxes as x, y, width, height and images `VG_100K/<id>.jpg` (PNG bytes)."""
    (folder / "VG_100K").mkdir(parents=True, exist_ok=True)
    rows = []
    for image_id, image, regions in entries:
        (folder / "VG_100K" / f"{image_id}.jpg").write_bytes(image_bytes(image))  # lossless: exact edges
        rows.append(
            {
                "id": image_id,
                "regions": [
                    {
                        "region_id": 100 * image_id + k,
                        "image_id": image_id,
                        "phrase": phrase,
                        "x": box[0],
                        "y": box[1],
                        "width": box[2] - box[0],
                        "height": box[3] - box[1],
                    }
                    for k, (box, phrase) in enumerate(regions)
                ],
            }
        )
    path = folder / "region_descriptions.json"
    path.write_text(json.dumps(rows))
    return path


def write_refer(folder: Path, entries: list[tuple[str, Image.Image, list[tuple[list[float], list[str], str]]]]) -> Path:
    """The refer API's `refs(umd).p` + `instances.json` (bbox xywh) with images under `train2014/`.

    Each entry: (file name, image, [(xyxy box, sentences, split), ...]).
    """
    (folder / "train2014").mkdir(parents=True, exist_ok=True)
    images, annotations, refs = [], [], []
    for image_index, (name, image, regions) in enumerate(entries):
        image.save(folder / "train2014" / name)
        images.append({"id": image_index + 1, "file_name": name, "width": image.width, "height": image.height})
        for box, sentences, split in regions:
            ann_id = 500 + len(annotations)
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_index + 1,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                }
            )
            refs.append(
                {
                    "ref_id": len(refs),
                    "ann_id": ann_id,
                    "image_id": image_index + 1,
                    "split": split,
                    "category_id": 1,
                    "file_name": name.replace(".png", f"_{ann_id}.png"),
                    "sent_ids": [],
                    "sentences": [{"raw": s, "sent": s.lower(), "tokens": s.lower().split()} for s in sentences],
                }
            )
    (folder / "instances.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "shape"}]})
    )
    path = folder / "refs(umd).p"
    path.write_bytes(pickle.dumps(refs, protocol=2))
    return path


def write_refcoco_parquet(path: Path, rows: list[tuple[Image.Image, list[float], list[str]]]) -> Path:
    """The parquet layout: columns image (datasets Image), bbox (xywh), answer (list), file_name."""
    import datasets

    table = {
        "image": [{"bytes": image_bytes(image), "path": None} for image, _, _ in rows],
        "bbox": [[b[0], b[1], b[2] - b[0], b[3] - b[1]] for _, b, _ in rows],
        "answer": [answers for _, _, answers in rows],
        "file_name": [f"COCO_train2014_{i:012d}.jpg" for i in range(len(rows))],
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "bbox": datasets.Sequence(datasets.Value("float64")),
            "answer": datasets.Sequence(datasets.Value("string")),
            "file_name": datasets.Value("string"),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))
    return path
