"""Decoder output -> uint8 pixels, as each model's original writes its images."""
import pytest
import torch

from lineray.images import to_uint8
from lineray.models.family import FAMILIES


def test_pixels_round_for_llamagen_and_truncate_for_janus_and_lumina():
    # -1 + 10.7 / 127.5 maps to 10.7: LlamaGen (127.5 x + 128, cast) gives 11, Janus/Lumina ((x + 1) * 127.5, cast) 10.
    x = torch.tensor([-1.5, 1.5, -1 + 10.7 / 127.5, 0.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 255, 11, 128]
    assert to_uint8(x, "truncate")[0, 0, :, 0].tolist() == [0, 255, 10, 127]
    assert {name: f.pixel_rounding for name, f in FAMILIES.items()} == {
        "llamagen": "round", "janus": "truncate", "lumina": "truncate"}
    with pytest.raises(ValueError, match="pixel rounding must be one of round, truncate, got 'floor'"):
        to_uint8(x, "floor")
