"""Chameleon's VQGAN decoder (lineray.models.vqgan) against a checkpoint written here in Meta's key layout
(`{"state_dict": ...}` with the taming key names, encoder and loss keys included) and a plain functional
forward pass written from that key layout alone."""
import pytest
import torch
import torch.nn.functional as F
import yaml

from lineray.models.checkpoint import CheckpointError
from lineray.models.vqgan import VQGANConfig, VQGANDecoder

# A small taming ddconfig with Chameleon's depth (5 levels: 16x upsampling), 32-channel base.
DDCONFIG = dict(double_z=False, z_channels=32, resolution=64, in_channels=3, out_ch=3, ch=32,
                ch_mult=[1, 1, 2, 2, 4], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
N_EMBED, EMBED_DIM = 64, 8


def meta_state_dict(dd: dict, n_embed: int, embed_dim: int, seed: int = 0) -> dict:
    """Random weights under the keys of Meta's vqgan.ckpt (taming VQModel), built from the ddconfig."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def put(key, *shape, scale=0.1):
        sd[key] = scale * torch.randn(*shape, generator=g)

    def conv(key, cin, cout, k):
        put(f"{key}.weight", cout, cin, k, k, scale=(cin * k * k) ** -0.5)
        put(f"{key}.bias", cout)

    def norm(key, c):
        sd[f"{key}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        put(f"{key}.bias", c)

    def resblock(key, cin, cout):
        norm(f"{key}.norm1", cin), conv(f"{key}.conv1", cin, cout, 3)
        norm(f"{key}.norm2", cout), conv(f"{key}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{key}.nin_shortcut", cin, cout, 1)

    def attn(key, c):
        norm(f"{key}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{key}.{part}", c, c, 1)

    ch, mult, z = dd["ch"], dd["ch_mult"], dd["z_channels"]
    n = len(mult)
    block_in = ch * mult[-1]
    res = dd["resolution"] // 2 ** (n - 1)
    conv("decoder.conv_in", z, block_in, 3)
    resblock("decoder.mid.block_1", block_in, block_in)
    attn("decoder.mid.attn_1", block_in)
    resblock("decoder.mid.block_2", block_in, block_in)
    for level in reversed(range(n)):
        for j in range(dd["num_res_blocks"] + 1):
            resblock(f"decoder.up.{level}.block.{j}", block_in, ch * mult[level])
            block_in = ch * mult[level]
            if res in dd["attn_resolutions"]:
                attn(f"decoder.up.{level}.attn.{j}", block_in)
        if level:
            conv(f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
            res *= 2
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, dd["out_ch"], 3)
    put("quantize.embedding.weight", n_embed, embed_dim, scale=1.0)
    conv("post_quant_conv", embed_dim, z, 1)
    # Parts the decoder skips by name: the encoder half and the training loss' networks.
    conv("encoder.conv_in", 3, ch, 3)
    resblock("encoder.down.0.block.0", ch, ch)
    conv("encoder.conv_out", ch * mult[-1], z, 3)
    conv("quant_conv", z, embed_dim, 1)
    put("loss.discriminator.main.0.weight", 8, 3, 4, 4)
    put("loss.perceptual_loss.net.slice1.0.weight", 8, 3, 3, 3)
    return sd


def reference_decode(sd: dict, codes: torch.Tensor, dd: dict) -> torch.Tensor:
    """taming's decode written from the key layout: lookup (no l2 norm), post_quant_conv, decoder, clamp."""
    def conv(x, key, pad):
        return F.conv2d(x, sd[f"{key}.weight"], sd[f"{key}.bias"], padding=pad)

    def gn(x, key):
        return F.group_norm(x, 32, sd[f"{key}.weight"], sd[f"{key}.bias"], eps=1e-6)

    def swish(x):
        return x * torch.sigmoid(x)

    def resblock(x, key):
        h = conv(swish(gn(x, f"{key}.norm1")), f"{key}.conv1", 1)
        h = conv(swish(gn(h, f"{key}.norm2")), f"{key}.conv2", 1)
        return (conv(x, f"{key}.nin_shortcut", 0) if f"{key}.nin_shortcut.weight" in sd else x) + h

    def attn(x, key):
        b, c, hh, ww = x.shape
        y = gn(x, f"{key}.norm")
        q, k, v = (conv(y, f"{key}.{p}", 0).reshape(b, c, hh * ww) for p in "qkv")
        w = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * c ** -0.5, dim=2)
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + conv(out, f"{key}.proj_out", 0)

    z = sd["quantize.embedding.weight"][codes].permute(0, 3, 1, 2)
    h = conv(conv(z, "post_quant_conv", 0), "decoder.conv_in", 1)
    h = resblock(attn(resblock(h, "decoder.mid.block_1"), "decoder.mid.attn_1"), "decoder.mid.block_2")
    for level in reversed(range(len(dd["ch_mult"]))):
        for j in range(dd["num_res_blocks"] + 1):
            h = resblock(h, f"decoder.up.{level}.block.{j}")
            if f"decoder.up.{level}.attn.{j}.q.weight" in sd:
                h = attn(h, f"decoder.up.{level}.attn.{j}")
        if level:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.up.{level}.upsample.conv", 1)
    return conv(swish(gn(h, "decoder.norm_out")), "decoder.conv_out", 1).clamp(-1, 1)


def write_meta_files(tmp_path, dd=DDCONFIG, state_dict=None, n_embed=N_EMBED, embed_dim=EMBED_DIM):
    """vqgan.ckpt ({"state_dict": ...}) and vqgan.yaml as Meta ships them (lossconfig included)."""
    sd = meta_state_dict(dd, n_embed, embed_dim) if state_dict is None else state_dict
    torch.save({"state_dict": sd}, tmp_path / "vqgan.ckpt")
    (tmp_path / "vqgan.yaml").write_text(yaml.safe_dump({"model": {
        "target": "taming.models.vqgan.VQModel",
        "params": {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": dd,
                   "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}}}))
    return sd


def test_config_is_read_from_vqgan_yaml(tmp_path):
    write_meta_files(tmp_path)
    cfg = VQGANConfig.from_yaml(tmp_path / "vqgan.yaml")
    assert (cfg.codebook_size, cfg.codebook_embed_dim, cfg.ch, cfg.ch_mult) == (64, 8, 32, (1, 1, 2, 2, 4))
    assert cfg.attn_resolutions == () and not cfg.codebook_l2_norm and cfg.downsample == 16
    default = VQGANConfig()  # Chameleon's published values
    assert (default.codebook_size, default.codebook_embed_dim, default.z_channels) == (8192, 256, 256)


@pytest.mark.parametrize("attn_resolutions", [[], [4, 16]], ids=["chameleon", "with_level_attention"])
def test_decoder_loads_meta_checkpoint_strictly_and_equals_the_reference(tmp_path, attn_resolutions):
    dd = dict(DDCONFIG, attn_resolutions=attn_resolutions)
    sd = write_meta_files(tmp_path, dd)
    vq = VQGANDecoder.from_files(tmp_path / "vqgan.ckpt")
    assert len(vq.decoder.up) == 5 and hasattr(vq.decoder.up[4], "upsample") and not hasattr(vq.decoder.up[0], "upsample")
    assert vq.decoder.up[0].block[0].conv1.weight.shape[0] == 32  # up.0 is the highest resolution (ch * 1)
    assert vq.decoder.up[4].block[0].conv1.weight.shape[0] == 128
    assert sum(len(u.attn) for u in vq.decoder.up) == (0 if not attn_resolutions else 4)
    codes = torch.randint(0, N_EMBED, (2, 3, 5), generator=torch.Generator().manual_seed(3))  # non-square
    images = vq.decode_codes(codes, chunk_size=1)
    assert images.shape == (2, 3, 48, 80) and vq.image_size(3) == 48 and vq.codebook_size == N_EMBED
    assert images.std() > 0.05
    torch.testing.assert_close(images, reference_decode(sd, codes, dd), atol=2e-5, rtol=1e-4)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = meta_state_dict(DDCONFIG, N_EMBED, EMBED_DIM)
    del sd["decoder.up.2.block.1.conv2.bias"]
    sd["decoder.up.5.block.0.conv1.weight"] = torch.zeros(1)
    write_meta_files(tmp_path, state_dict=sd)
    with pytest.raises(CheckpointError) as err:
        VQGANDecoder.from_files(tmp_path / "vqgan.ckpt", tmp_path / "vqgan.yaml")
    msg = str(err.value)
    assert "missing keys: decoder.up.2.block.1.conv2.bias" in msg
    assert "unexpected keys: decoder.up.5.block.0.conv1.weight" in msg
    assert "encoder." not in msg and "loss." not in msg and "quant_conv" not in msg.replace("post_quant_conv", "")


def test_config_without_ddconfig_is_a_clear_error(tmp_path):
    (tmp_path / "vqgan.yaml").write_text("model: {params: {embed_dim: 8}}\n")
    with pytest.raises(CheckpointError, match="vqgan.yaml: expected model.params with n_embed"):
        VQGANConfig.from_yaml(tmp_path / "vqgan.yaml")
