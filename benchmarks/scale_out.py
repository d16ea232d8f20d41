"""Scale-out benchmarks, one run on one machine:

- `embed`: images per second embedded by `mmgem embed` (Ray Data, 1 and 2 CPU actors) against `mmgem index` (one
  process, `--region-grids 0`: image vectors only, as Ray writes) on the same folder of drawn images and the same
  saved model; wall time of the embedding itself (Ray's start and, for Ray, the actors' model loads included).
- `search`: index build time, query latency (median of single queries, k=10) and recall@10 against exact search of
  the LanceDB backend (`mmgem.search.lance_store`, IVF-HNSW-SQ with re-ranking) and the FAISS store (HNSW, the
  index defaults), on the same clustered unit vectors.

    python benchmarks/scale_out.py                   # 256 images at --size tiny; 20k vectors of 256 dims
    python benchmarks/scale_out.py --quick           # 64 images; 6k vectors

Results: `--output` (default `benchmarks/results/scale-out/`) `results.json` and `table.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `mmgem` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from benchmarks.search import build_store, clustered_unit_vectors
from benchmarks.sizes import SIZES, build_bench_model
from mmgem.scale.ray_embed import embed_collection
from mmgem.search.indexer import index_images
from mmgem.search.lance_store import LanceStore, write_meta, write_table
from mmgem.search.store import faiss_threads
from mmgem.synthetic import all_pairs, render_scene


def _images(folder: Path, count: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        render_scene(rng, size, 2, all_pairs())[0].save(folder / f"{i:05d}.png")


def embed_benchmark(size: str, count: int, seed: int, workdir: Path) -> dict[str, Any]:
    """Images/s: `mmgem index` in this process, then Ray Data with 1 and 2 actors (one torch thread each)."""
    import ray

    bench = build_bench_model(SIZES[size], torch.device("cpu"), torch.float32, seed)
    model_dir = workdir / "model"
    bench.model.save_pretrained(model_dir)
    bench.processor.save_pretrained(model_dir)
    image_size = bench.config.vision_config.image_size
    _images(workdir / "images", count, image_size, seed)
    results: dict[str, Any] = {"images": count, "size": size, "image_px": image_size}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray actor runs
    start = time.perf_counter()
    index_images(
        bench.model,
        bench.processor,
        str(workdir / "images"),
        workdir / "index",
        model_name=str(model_dir),
        region_grids=(),
        progress=False,
    )
    results["mmgem_index_images_per_s"] = count / (time.perf_counter() - start)
    torch.set_num_threads(threads)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for actors in (1, 2):
            start = time.perf_counter()
            embed_collection(
                model_dir,
                workdir / "images",
                workdir / f"ray-{actors}",
                concurrency=actors,
                batch_size=32,
                part_size=max(1, count // 4),
                progress=False,
            )
            results[f"ray_{actors}_actor_images_per_s"] = count / (time.perf_counter() - start)
    finally:
        ray.shutdown()
    return results


def _recall(found: list[list[int]], exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]))


def _latency_ms(search: Any, queries: np.ndarray) -> float:
    times = []
    for query in queries:
        start = time.perf_counter()
        search(query)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def search_benchmark(count: int, dim: int, num_queries: int, seed: int, workdir: Path) -> dict[str, Any]:
    """Build seconds, median query ms and recall@10 of FAISS HNSW (the store) and LanceDB (the backend)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, dim)).astype(np.float32)
    vectors = clustered_unit_vectors(count, dim, rng, centres)
    queries = clustered_unit_vectors(num_queries, dim, rng, centres)
    exact = torch.topk(torch.from_numpy(queries) @ torch.from_numpy(vectors).T, 10, dim=1).indices.numpy()
    results: dict[str, Any] = {"vectors": count, "dim": dim, "queries": num_queries}

    with faiss_threads(1):
        store, seconds = build_store(workdir / "faiss", vectors)
        results["faiss_build_s"] = seconds
        results["faiss_query_ms"] = _latency_ms(lambda q: store.search(q, "image", 10), queries)
        results["faiss_recall@10"] = _recall(
            [[h.row for h in hits] for hits in store.search(queries, "image", 10)], exact
        )
    store.close()

    folder = workdir / "lance"
    folder.mkdir()
    items = [{"path": f"v{i}", "kind": "image"} for i in range(count)]
    start = time.perf_counter()
    write_table(folder, vectors, items, build_ann=True)
    write_meta(folder, dim, {"name_or_path": "benchmark", "fingerprint": "-"}, (), exact=False)
    results["lancedb_build_s"] = time.perf_counter() - start
    lance = LanceStore(folder)
    results["lancedb_ann"] = "flat (exact scan)" if lance.exact else "IVF_HNSW_SQ + refine"
    results["lancedb_query_ms"] = _latency_ms(lambda q: lance.search(q, "image", 10), queries)
    results["lancedb_recall@10"] = _recall(
        [[h.row for h in hits] for hits in lance.search(queries, "image", 10)], exact
    )
    results["lancedb_exact_query_ms"] = _latency_ms(lambda q: lance.search(q, "image", 10, exact=True), queries[:20])
    return results


def table(results: dict[str, Any]) -> str:
    embed, search = results["embed"], results["search"]
    lines = [
        f"Embedding {embed['images']} images ({embed['size']} model, {embed['image_px']} px), images/s:",
        "",
        "| mmgem index (1 process) | Ray Data, 1 actor | Ray Data, 2 actors |",
        "|---|---|---|",
        f"| {embed['mmgem_index_images_per_s']:.1f} | {embed['ray_1_actor_images_per_s']:.1f} | "
        f"{embed['ray_2_actor_images_per_s']:.1f} |",
        "",
        f"Search over {search['vectors']} vectors of {search['dim']} dims ({search['queries']} queries, k=10):",
        "",
        "| backend | build s | query ms (median) | recall@10 |",
        "|---|---|---|---|",
        f"| FAISS HNSW (store defaults) | {search['faiss_build_s']:.2f} | {search['faiss_query_ms']:.3f} | "
        f"{search['faiss_recall@10']:.3f} |",
        f"| LanceDB {search['lancedb_ann']} | {search['lancedb_build_s']:.2f} | {search['lancedb_query_ms']:.3f} | "
        f"{search['lancedb_recall@10']:.3f} |",
        f"| LanceDB exact scan | - | {search['lancedb_exact_query_ms']:.3f} | 1.000 |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 images and 6k vectors")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES), help="model size of the embedding runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/scale-out"))
    args = parser.parse_args(argv)
    images, vectors, queries = (64, 6000, 100) if args.quick else (256, 20000, 200)
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "search": search_benchmark(vectors, 256, queries, args.seed, Path(tmp)),
            "embed": embed_benchmark(args.size, images, args.seed, Path(tmp) / "embed"),
        }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.output / "table.md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
