"""mmgem: the library around MM-GEM (arXiv 2405.19333), the Multi-Modal Generative Embedding Model.

The model itself lives in `modeling_mmgem`, the remote code that travels to the Hub next to the weights; this
package builds, trains, evaluates and integrates it, and imports `modeling_mmgem`, never the reverse.

Subpackages: `mmgem.data` (records, datasets, the collator), `mmgem.training` (the HF Trainer), `mmgem.evaluation`
(metrics and evaluation), `mmgem.integrations` (LoRA, sentence-transformers); modules `mmgem.build` (models and
tokenizers from configs), `mmgem.synthetic` (the shapes dataset), `mmgem.demo` and `mmgem.cli`.
"""
