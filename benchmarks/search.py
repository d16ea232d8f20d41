"""Search benchmarks: indexing throughput, query latency of the FAISS HNSW index against an exact torch matmul, and
the index's recall@10 against exact search.

    python benchmarks/search.py                      # --size small, 10k and 100k vectors (a few minutes on 2 cores)
    python benchmarks/search.py --quick              # --size tiny, 2k and 10k vectors (under a minute)

- `indexing`: `mmgem.search.index_images` on a folder of drawn images (decode, embed, grid regions, append, ANN add)
  against the bare embedding of the same images (processor + get_image_features), images per second side by side.
- `query_latency_<n>`: one query (k=10) against n unit vectors: `VectorStore.search` (FAISS HNSW with the index
  defaults, results as `Hit`s) against `torch.topk(vectors @ query)`, interleaved; the ratio is ours / exact (lower
  is better). `ann_only_latency_<n>`: the FAISS call alone against the same matmul.
- `recall@10_<n>`: mean overlap of the index's top 10 with the exact top 10 over held-out queries (target >= 0.99).
- with `--libraries`, `usearch_vs_faiss_{build,query,recall@10}_<n>`: usearch's HNSW against FAISS's with equal
  settings (M=32, efConstruction=128, efSearch=64): the measurements behind the choice of FAISS (README).

The vectors are drawn around 200 random centres (clustered, as real embeddings are) in the model's projection
dimension; queries come from the same distribution. Results go to `--output` (default
`benchmarks/results/search-<size>/`): `results.json`, `table.md`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `mmgem` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.report import Record, markdown_table
from benchmarks.sizes import SIZES, build_bench_model
from benchmarks.timing import CLOCKS, TimingPlan, interleaved, median
from mmgem.embedding import encode_images
from mmgem.files import write_json_atomic, write_text_atomic
from mmgem.search import VectorStore, index_images
from mmgem.search.sources import folder_images, load_image
from mmgem.search.store import faiss_threads
from mmgem.synthetic import all_pairs, render_scene

REPO_ROOT = Path(__file__).resolve().parent.parent
RECALL_TARGET = 0.99


def clustered_unit_vectors(count: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """`count` unit vectors [count, dim] scattered around `centres`."""
    points = centres[rng.integers(0, len(centres), count)] + 0.5 * rng.standard_normal((count, dim))
    points = points.astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def build_store(folder: Path, vectors: np.ndarray) -> tuple[VectorStore, float]:
    """An index folder holding `vectors` as image rows (appended in chunks, as `mmgem index` does); build seconds."""
    store = VectorStore.create(folder, vectors.shape[1], {"name_or_path": "benchmark", "fingerprint": "-"})
    start = time.perf_counter()
    chunk = 4096
    for begin in tqdm(range(0, len(vectors), chunk), desc=f"Building {len(vectors)}", leave=False):
        rows = vectors[begin : begin + chunk]
        items = [{"path": f"v{begin + i}", "kind": "image", "file_rows": 1} for i in range(len(rows))]
        store.append(rows, items)
    store.save_ann()
    return store, time.perf_counter() - start


def recall_at_10(store: VectorStore, vectors: torch.Tensor, queries: np.ndarray) -> float:
    exact = torch.topk(torch.from_numpy(queries) @ vectors.T, 10, dim=1).indices.numpy()  # [Q, 10]
    found = [[h.row for h in hits] for hits in store.search(queries, "image", 10)]
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]))


def query_benchmarks(count: int, dim: int, plan: TimingPlan, seed: int, workdir: Path) -> list[Record]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, dim))
    data = clustered_unit_vectors(count, dim, rng, centres)
    queries = clustered_unit_vectors(200, dim, rng, centres)
    with faiss_threads(torch.get_num_threads()):  # building alone: FAISS may use every core
        store, build_s = build_store(workdir / f"store-{count}", data)
    vectors = torch.from_numpy(data)
    query = queries[0]
    query_t = torch.from_numpy(query)

    def ours() -> Any:
        return store.search(query, "image", 10)

    def ann_only() -> Any:
        return store.anns["image"].search(query[None], 10)

    def exact() -> Any:
        return torch.topk(vectors @ query_t, 10)

    with faiss_threads(1):
        samples = interleaved({"ours": ours, "ann": ann_only, "exact": exact}, torch.device("cpu"), plan)
        recall = recall_at_10(store, vectors, queries)
    common = dict(size=f"{count} x {dim}", device="cpu", dtype="float32", batch=1)
    exact_notes = f"recall@10 {recall:.4f} over {len(queries)} held-out queries"
    ann = store.meta["ann"]
    notes = f"FAISS HNSW M={ann['hnsw_m']} efConstruction={ann['ef_construction']} efSearch={ann['ef_search']}"
    return [
        Record(
            f"query_latency_{count}",
            median(samples["ours"]),
            "torch matmul + topk (exact)",
            median(samples["exact"]),
            target="report",
            notes=f"{notes}; build {build_s:.1f} s",
            **common,
        ),
        Record(
            f"ann_only_latency_{count}",
            median(samples["ann"]),
            "torch matmul + topk (exact)",
            median(samples["exact"]),
            target="report",
            notes=f"{notes}; the FAISS call alone",
            **common,
        ),
        Record(
            f"recall@10_{count}",
            recall,
            "exact top 10",
            1.0,
            target=f">= {RECALL_TARGET}",
            unit="recall",
            notes=f"{notes}; {exact_notes}",
            **common,
        ),
    ]


def library_comparison(count: int, dim: int, plan: TimingPlan, seed: int) -> list[Record]:
    """FAISS HNSW against usearch's HNSW with equal settings (M=32, efConstruction=128, efSearch=64), one thread:
    build time, one-query latency and recall@10 (the measurements behind the choice of FAISS)."""
    import faiss
    from usearch.index import Index

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, dim))
    data = clustered_unit_vectors(count, dim, rng, centres)
    queries = clustered_unit_vectors(200, dim, rng, centres)
    exact = torch.topk(torch.from_numpy(queries) @ torch.from_numpy(data).T, 10, dim=1).indices.numpy()
    with faiss_threads(1):
        start = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 128
        hnsw.add(data)
        hnsw.hnsw.efSearch = 64
        faiss_build = time.perf_counter() - start
        start = time.perf_counter()
        other = Index(ndim=dim, metric="ip", connectivity=32, expansion_add=128, expansion_search=64)
        other.add(np.arange(count), data, threads=1)
        usearch_build = time.perf_counter() - start
        query = queries[0]
        calls = {"faiss": lambda: hnsw.search(query[None], 10), "usearch": lambda: other.search(query, 10)}
        samples = interleaved(calls, torch.device("cpu"), plan)
        faiss_recall = np.mean([len(set(hnsw.search(q[None], 10)[1][0]) & set(e)) / 10 for q, e in zip(queries, exact)])
        usearch_recall = np.mean([len(set(other.search(q, 10).keys) & set(e)) / 10 for q, e in zip(queries, exact)])
    common = dict(size=f"{count} x {dim}", device="cpu", dtype="float32", batch=1)
    return [
        Record(f"usearch_vs_faiss_build_{count}", usearch_build, "FAISS IndexHNSWFlat", faiss_build, **common),
        Record(
            f"usearch_vs_faiss_query_{count}",
            median(samples["usearch"]),
            "FAISS IndexHNSWFlat",
            median(samples["faiss"]),
            **common,
        ),
        Record(
            f"usearch_vs_faiss_recall@10_{count}",
            float(usearch_recall),
            "FAISS IndexHNSWFlat",
            float(faiss_recall),
            unit="recall",
            **common,
        ),
    ]


def indexing_benchmark(size: str, num_images: int, plan: TimingPlan, seed: int, workdir: Path) -> list[Record]:
    bench = build_bench_model(SIZES[size], torch.device("cpu"), torch.float32, seed)
    image_size = bench.config.vision_config.image_size
    folder = workdir / "images"
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        render_scene(rng, image_size, 2, all_pairs())[0].save(folder / f"{i:05d}.png")
    paths = [str(p) for p in folder_images(folder)]
    runs = {"n": 0}

    def ours() -> Any:
        runs["n"] += 1
        return index_images(
            bench.model, bench.processor, str(folder), workdir / f"index-{runs['n']}", batch_size=32, progress=False
        )

    def baseline() -> Any:
        return encode_images(bench.model, bench.processor, [load_image(p) for p in paths], batch_size=32)

    with faiss_threads(1):
        samples = interleaved({"ours": ours, "baseline": baseline}, torch.device("cpu"), plan)
    ours_s, base_s = median(samples["ours"]), median(samples["baseline"])
    notes = (
        f"{num_images / ours_s:.1f} images/s indexed (image + 2x2 regions, FAISS add, files) vs "
        f"{num_images / base_s:.1f} images/s embedded"
    )
    return [
        Record(
            "indexing",
            ours_s,
            "decode + embed_images, same images",
            base_s,
            size=size,
            device="cpu",
            dtype="float32",
            batch=num_images,
            target="report",
            notes=notes,
        )
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="model size for indexing (small)")
    parser.add_argument("--counts", default=None, help="vector counts, comma-separated (default 10000,100000)")
    parser.add_argument("--images", type=int, default=None, help="images to index (default 256; quick 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall, or cpu (process CPU time: robust on a shared machine; use with --threads 1)",
    )
    parser.add_argument("--libraries", action="store_true", help="also compare FAISS with usearch (equal settings)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    size = args.size or ("tiny" if args.quick else "small")
    counts = [int(c) for c in (args.counts or ("2000,10000" if args.quick else "10000,100000")).split(",")]
    num_images = args.images or (64 if args.quick else 256)
    if min(counts) < 10 or num_images < 1:
        raise ValueError("`--counts` must be >= 10 vectors each and `--images` >= 1.")
    if args.threads:
        torch.set_num_threads(args.threads)
    reps, warmup = (3, 1) if args.quick else (7, 2)
    plan = TimingPlan(reps=reps, warmup=warmup, clock=args.clock)
    output = args.output or REPO_ROOT / "benchmarks" / "results" / f"search-{size}"
    records: list[Record] = []
    with tempfile.TemporaryDirectory() as workdir:
        for count in counts:
            records += query_benchmarks(count, SIZES[size].projection_dim, plan, args.seed, Path(workdir))
            if args.libraries:
                records += library_comparison(count, SIZES[size].projection_dim, plan, args.seed)
        indexing_plan = TimingPlan(reps=3, warmup=1, min_block_s=0.0, clock=args.clock)
        records += indexing_benchmark(size, num_images, indexing_plan, args.seed, Path(workdir))
    write_json_atomic(output / "results.json", [r.to_dict() for r in records])
    table = markdown_table(records)
    write_text_atomic(output / "table.md", table + "\n")
    print(table)
    for record in records:
        print(f"- {record.name}: {record.notes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
