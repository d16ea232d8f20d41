"""Search your own images with an MM-GEM: index a folder or webdataset shards, query by text, image or region.

`index_images` (and `mmgem index`) writes an index folder; `ImageSearch` (and `mmgem search`) queries it. The
vectors live in FAISS (HNSW by default) next to an append-only copy of the vectors and their items
(see `mmgem.search.store`).
"""

from mmgem.search.indexer import index_images
from mmgem.search.searcher import ImageSearch
from mmgem.search.store import Hit, VectorStore

__all__ = ["Hit", "ImageSearch", "VectorStore", "index_images"]
