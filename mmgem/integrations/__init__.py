"""Integrations with other libraries: PEFT (LoRA) and sentence-transformers."""
