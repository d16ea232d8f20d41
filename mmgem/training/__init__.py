"""Training MM-GEM with the Hugging Face Trainer."""
