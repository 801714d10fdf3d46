"""Corpora, tokenizers and token packing."""
