"""mmgem: MM-GEM (arXiv 2405.19333) as a Hugging Face model.

The three remote-code files (`configuration_mmgem.py`, `modeling_mmgem.py`, `processing_mmgem.py`, plus the
`loss_mmgem.py` they import) are what `save_pretrained` copies next to the weights; the rest of the package
(building, training, evaluation, conversion) runs where mmgem is installed.
"""

from .configuration_mmgem import MMGEMConfig
from .modeling_mmgem import MMGEMFeaturesOutput, MMGEMModel, MMGEMOutput, MMGEMPreTrainedModel
from .processing_mmgem import MMGEMProcessor, add_mmgem_special_tokens

__all__ = [
    "MMGEMConfig",
    "MMGEMFeaturesOutput",
    "MMGEMModel",
    "MMGEMOutput",
    "MMGEMPreTrainedModel",
    "MMGEMProcessor",
    "add_mmgem_special_tokens",
]
