"""Training data: records of every supported format, datasets and the batch collator."""
