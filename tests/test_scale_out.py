"""Ray Data batch embedding (`mmgem embed`) on a local 2-CPU Ray started and stopped here, and the LanceDB backend.

One module-scoped Ray and one embedded collection serve every test (Ray's start-up is the expensive part).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mmgem.build import tiny_mmgem

from .conftest import random_images

ray = pytest.importorskip("ray", reason="Ray Data is the `scale` extra (make venv installs it)")
pq = pytest.importorskip("pyarrow.parquet")

NUM_IMAGES = 10
PART_SIZE = 4  # 10 images: parts of 4, 4 and 2


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A saved tiny model, a folder of 10 PNGs, the same images as a webdataset shard and as parquet."""
    root = tmp_path_factory.mktemp("collection")
    torch.manual_seed(0)
    model, processor = tiny_mmgem()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    images = random_images(NUM_IMAGES, seed=3)
    folder = root / "images" / "nested"
    folder.mkdir(parents=True)
    encoded = []
    for i, image in enumerate(images):
        image.save(folder / f"{i:02d}.png")
        encoded.append((folder / f"{i:02d}.png").read_bytes())
    with tarfile.open(root / "shard-000.tar", "w") as tar:
        for i, data in enumerate(encoded):
            for name, payload in ((f"s{i:02d}.png", data), (f"s{i:02d}.txt", f"picture {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    import pyarrow as pa

    (root / "table").mkdir()
    pq.write_table(
        pa.table(
            {
                "image": [{"bytes": d, "path": None} for d in encoded],
                "caption": [f"picture {i}" for i in range(NUM_IMAGES)],
            }
        ),
        root / "table" / "train-00000.parquet",
    )
    return {
        "root": root,
        "model": root / "model",
        "folder": root / "images",
        "images": images,
        "model_obj": model,
        "processor": processor,
    }


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _expected(collection) -> np.ndarray:
    from mmgem.embedding import encode_images

    return encode_images(collection["model_obj"].eval(), collection["processor"], collection["images"]).numpy()


def _read_embeddings(output: Path) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(sorted((output / "embeddings").glob("part-*.parquet")))
    return table.column("id").to_pylist(), np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_embedding_of_a_folder_equals_the_single_process_vectors_and_resumes(collection, local_ray, tmp_path):
    from mmgem.scale.ray_embed import embed_collection, part_files

    output = tmp_path / "out"
    summary = embed_collection(
        collection["model"],
        collection["folder"],
        output,
        concurrency=2,
        batch_size=3,
        part_size=PART_SIZE,
        progress=False,
    )
    assert (summary["parts"], summary["written"], summary["skipped"], summary["images"]) == (3, 3, 0, NUM_IMAGES)
    ids, vectors = _read_embeddings(output)
    assert [Path(i).name for i in ids] == [f"{i:02d}.png" for i in range(NUM_IMAGES)]
    np.testing.assert_allclose(vectors, _expected(collection), atol=1e-5, rtol=0)
    # clip-retrieval's layout: npy parts aligned with metadata parts, in the same order.
    npy = np.concatenate([np.load(f) for f in sorted((output / "img_emb").glob("img_emb_*.npy"))])
    metadata = pq.read_table(sorted((output / "metadata").glob("metadata_*.parquet")))
    np.testing.assert_array_equal(npy, vectors)
    assert metadata.column("image_path").to_pylist() == ids
    assert npy.dtype == np.float32 and [np.load(f).shape[0] for f in sorted((output / "img_emb").glob("*.npy"))] == [
        4,
        4,
        2,
    ]
    assert not list(output.rglob(".*.tmp"))

    # A rerun after losing one part writes only that part, with the same vectors.
    part_files(output, 1)[0].unlink()
    before = {p: p.stat().st_mtime_ns for p in (part_files(output, 0)[0], part_files(output, 2)[0])}
    again = embed_collection(
        collection["model"],
        collection["folder"],
        output,
        concurrency=1,
        batch_size=4,
        part_size=PART_SIZE,
        progress=False,
    )
    assert (again["written"], again["skipped"], again["images"]) == (1, 2, PART_SIZE)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    # Batches of 4 instead of 3: the CPU's matrix kernels may round the last bit differently for another batch size.
    np.testing.assert_allclose(_read_embeddings(output)[1], vectors, atol=1e-6, rtol=0)
    nothing = embed_collection(collection["model"], collection["folder"], output, part_size=PART_SIZE, progress=False)
    assert (nothing["written"], nothing["skipped"]) == (0, 3)
    with pytest.raises(ValueError, match="part_size=4, not 5"):
        embed_collection(collection["model"], collection["folder"], output, part_size=5, progress=False)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_embeds_webdataset_shards_and_parquet_with_their_texts(collection, local_ray, tmp_path):
    from mmgem.scale.ray_embed import embed_collection

    expected = _expected(collection)
    for source in (collection["root"] / "shard-000.tar", collection["root"] / "table"):
        output = tmp_path / source.stem
        embed_collection(
            collection["model"], source, output, concurrency=2, batch_size=4, part_size=PART_SIZE, progress=False
        )
        ids, vectors = _read_embeddings(output)
        assert len(ids) == NUM_IMAGES and all("#" in i for i in ids)
        np.testing.assert_allclose(vectors, expected, atol=1e-5, rtol=0)
        texts = pq.read_table(sorted((output / "metadata").glob("*.parquet"))).column("caption").to_pylist()
        assert texts == [f"picture {i}" for i in range(NUM_IMAGES)]


def test_embed_refuses_bad_options_before_any_work(collection, tmp_path, capsys):
    from mmgem.cli import main

    cases = [
        (["--images", str(collection["folder"]), "--concurrency", "0"], "`--concurrency` must be a positive integer"),
        (["--images", str(tmp_path), "--batch-size", "2"], "holds no images"),
        (["--images", str(collection["folder"]), "--num-gpus", "-1"], "`--num-gpus` must be a number >= 0"),
    ]
    for extra, message in cases:
        assert main(["embed", "--model", str(collection["model"]), "--output", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ LanceDB backend
def _hit_rows(hits) -> list[tuple[str, float]]:
    return [(hit.path, round(hit.score, 5)) for hit in hits]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_lancedb_backend_answers_as_the_faiss_index_for_index_search_and_ray_output(collection, local_ray, tmp_path):
    """`mmgem index --backend lancedb` and `mmgem embed --lancedb` give the hits (paths, cosine scores) of the FAISS
    index, through `ImageSearch` (what `mmgem search` and the app use)."""
    from mmgem.cli import main
    from mmgem.search import ImageSearch
    from mmgem.search.lance_store import LanceStore, is_lance_index

    model, processor = collection["model_obj"], collection["processor"]
    common = [
        "--model",
        str(collection["model"]),
        "--images",
        str(collection["folder"]),
        "--no-progress",
        "--captions",
        "--caption-tokens",
        "4",
    ]
    assert main(["index", *common, "--output", str(tmp_path / "faiss"), "--exact"]) == 0
    assert main(["index", *common, "--output", str(tmp_path / "lance"), "--backend", "lancedb"]) == 0
    assert is_lance_index(tmp_path / "lance") and not is_lance_index(tmp_path / "faiss")
    faiss_search = ImageSearch(tmp_path / "faiss", model, processor)
    lance_search = ImageSearch(tmp_path / "lance", model, processor)
    assert isinstance(lance_search.store, LanceStore)
    assert lance_search.store.count("region") == faiss_search.store.count("region") > 0
    for query in ("a red circle", "blue"):
        expected = _hit_rows(faiss_search.text(query, k=5, exact=True))
        assert _hit_rows(lance_search.text(query, k=5)) == expected
    image = collection["folder"] / "nested" / "03.png"
    assert _hit_rows(lance_search.image(image, k=3, region=(0, 0, 20, 20))) == _hit_rows(
        faiss_search.image(image, k=3, region=(0, 0, 20, 20), exact=True)
    )

    # Ray output -> LanceDB without embedding again: the same image hits.
    embedded = tmp_path / "embedded"
    embed = [
        "embed",
        "--model",
        str(collection["model"]),
        "--images",
        str(collection["folder"]),
        "--output",
        str(embedded),
        "--part-size",
        "4",
        "--lancedb",
        str(tmp_path / "from-ray"),
        "--no-progress",
    ]
    assert main(embed) == 0
    ray_search = ImageSearch(tmp_path / "from-ray", model, processor)
    for query in ("a red circle", "green square"):
        expected = faiss_search.text(query, k=4, caption_weight=0.0, exact=True)
        got = ray_search.text(query, k=4)
        assert [h.path for h in got] == [h.path for h in expected]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in expected], atol=1e-5)
