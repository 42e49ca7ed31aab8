"""Lumina-mGPT (Alpha-VLLM/Lumina-mGPT-7B-512/768/1024; issue 14): a Chameleon-7B LM writing images as lines
of W codes + an end-of-line token, decoded by Chameleon's VQGAN (lineray.models.vqgan).

  model.py   the family's parts on the shared Transformer (shared table, image-code head, CFG row,
             forced end-of-line) and the token -> image decoder
  folder.py  a downloaded folder: config.json, the key map, sharded safetensors, Meta's VQGAN files
  vocab.py   image codes and special tokens, by name
  prompt.py  the prompt template and image sizes
"""
