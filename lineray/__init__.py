"""lineray: batch image generation with autoregressive image models on Ray."""
__version__ = "0.1.0"
