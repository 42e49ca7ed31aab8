"""Janus-Pro (deepseek-ai/Janus-Pro-1B, -7B): text-to-image on the shared Transformer (model.py)."""
