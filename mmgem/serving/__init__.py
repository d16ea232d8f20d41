"""Serving MM-GEM with inference engines."""
