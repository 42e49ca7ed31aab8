"""The VQ decoder's GPU settings, checked on CPU: decoding in chunks, in channels_last and in bf16 gives
the images of a plain one-pass fp32 decode."""
import torch

from lineray.models.vq import VQConfig, VQDecoder

SMALL_VQ = VQConfig(codebook_size=64, ch=32, z_channels=64)


def decoder(**kw) -> VQDecoder:
    torch.manual_seed(0)
    vq = VQDecoder(SMALL_VQ)
    with torch.no_grad():  # a random but not degenerate decoder: GroupNorm affine and biases non-trivial
        for p in vq.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vq.to_device("cpu", **kw)


CODES = torch.randint(0, 64, (5, 2, 2), generator=torch.Generator().manual_seed(1))


def test_decoding_in_chunks_gives_the_one_pass_images():
    vq = decoder()
    whole = vq.decode_codes(CODES, chunk_size=len(CODES))
    assert whole.shape == (5, 3, 32, 32) and whole.dtype == torch.float32
    assert whole.std() > 0.05  # not a constant image
    for chunk in (1, 2, 3):
        torch.testing.assert_close(vq.decode_codes(CODES, chunk_size=chunk), whole, atol=1e-5, rtol=1e-5)


def test_channels_last_and_bf16_give_the_default_images():
    reference = decoder().decode_codes(CODES)
    vq = decoder(channels_last=True)
    assert vq.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not vq.decoder.conv_in.weight.is_contiguous()
    torch.testing.assert_close(vq.decode_codes(CODES, chunk_size=2), reference, atol=1e-5, rtol=1e-5)
    bf16 = decoder(dtype=torch.bfloat16, channels_last=True)
    assert bf16.decoder.conv_in.weight.dtype == torch.bfloat16
    assert bf16.quantize.embedding.weight.dtype == torch.float32  # the codebook lookup stays exact
    got = bf16.decode_codes(CODES, chunk_size=2)
    assert got.dtype == torch.float32
    err = (got - reference).abs()  # bf16 rounding through ~20 layers; 1 pixel level is 2/255 = 0.008
    assert err.mean() < 0.01 and err.max() < 0.1
