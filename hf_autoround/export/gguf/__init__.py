"""GGUF export (filled in below)."""
