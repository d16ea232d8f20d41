"""mmgem: MM-GEM (arXiv 2405.19333) as a Hugging Face model."""
