"""Evaluation: retrieval, zero-shot, captioning and region metrics."""
