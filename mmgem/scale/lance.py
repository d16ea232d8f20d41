"""`mmgem embed`'s output into a LanceDB search index, without embedding again (see mmgem.search.lance_store)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mmgem.loading import load_model
from mmgem.search.indexer import model_fingerprint
from mmgem.search.lance_store import new_folder, write_meta, write_table


def import_embeddings(
    embeddings: str | os.PathLike[str], output: str | os.PathLike[str], model: Any = None, exact: bool = False
) -> Path:
    """A LanceDB index folder `output` from `mmgem embed`'s output folder (its `embeddings/*.parquet`): the image
    vectors are loaded as they are; the model (given, or loaded from the embed manifest) only names the space."""
    import pyarrow.parquet as pq

    embeddings, output = Path(embeddings), Path(output)
    parts = sorted((embeddings / "embeddings").glob("part-*.parquet"))
    manifest_file = embeddings / "manifest.json"
    if not parts or not manifest_file.is_file():
        raise ValueError(f"`embeddings` {embeddings} is not an `mmgem embed` output (no manifest.json / embeddings/).")
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    if len(parts) != manifest["parts"]:
        raise ValueError(
            f"`embeddings` {embeddings} holds {len(parts)} of {manifest['parts']} parts; finish the "
            "`mmgem embed` run first (a rerun resumes it)."
        )
    if model is None:
        model, _ = load_model(manifest["model"])
    new_folder(output)
    table = pq.read_table(parts)
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    items = [
        {
            "kind": "image",
            "path": row["image_path"],
            "width": row["width"],
            "height": row["height"],
            "caption": row["caption"] if manifest.get("captions") else None,
            "text": row["text"],
        }
        for row in table.drop_columns(["embedding"]).to_pylist()
    ]
    write_table(output, vectors, items, build_ann=not exact)
    write_meta(output, vectors.shape[1], model_fingerprint(model, manifest["model"]), (), exact)
    return output
