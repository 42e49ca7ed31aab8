"""Reading Lumina-mGPT folders: the vocabulary (image codes by name, special ids by name), the prompt
template, config.json checks, and the key map onto lineray's names."""
import json

import pytest
import torch

from lineray.models.checkpoint import Source
from lineray.models.lumina.folder import (LuminaFolderError, key_map, open_weights, read_hf_config, read_vocab,
                                         repeat_over_heads)
from lineray.models.lumina.prompt import ImageSize, LuminaPromptEncoder, PromptError
from lineray.models.lumina.vocab import LuminaVocab, VocabularyError, image_code
from lumina_fixtures import CODE_POSITION, IMAGE_START, N_CODES, build_tiny_lumina, vocabulary_map


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_lumina(tmp_path_factory.mktemp("lumina"))


def test_image_code_names():
    assert image_code("IMGIMGBZ") == 1 and image_code("IMGIMGBAZ") == 10 and image_code("IMGIMGJJJJZ") == 9999
    assert image_code("IMGIMGZ") is None and image_code("<eoss>") is None and image_code("IMGIMGKZ") is None


def test_vocabulary_from_config_and_from_tokenizer_agree_and_map_codes_by_name(tiny):
    names = vocabulary_map()
    from_config = read_vocab(tiny.lumina)
    (tiny.hf / "nomap").mkdir()
    cfg = json.loads((tiny.hf / "config.json").read_text())
    del cfg["vocabulary_map"]
    (tiny.hf / "nomap" / "config.json").write_text(json.dumps(cfg))
    (tiny.hf / "nomap" / "tokenizer.json").write_bytes((tiny.hf / "tokenizer.json").read_bytes())
    from_tokenizer = read_vocab(tiny.hf / "nomap")
    for v in (from_config, from_tokenizer):
        assert (v.bos, v.begin_of_image, v.end_of_image, v.end_of_line, v.end_of_turn) == (
            0, names["<racm3:break>"], names["<eoss>"], names["<reserved08799>"], names["<reserved08706>"])
        assert (v.image_start, v.image_count, v.vocab_size) == (IMAGE_START, N_CODES, 96)
        assert v.size_id(2) == names["<reserved08802>"] and v.grids_of(names["<reserved08803>"]) == 3
        codes = torch.arange(N_CODES)
        bpe = v.code_to_bpe(codes)
        # the names, not an offset: code c sits at IMAGE_START + CODE_POSITION[c]
        assert bpe.tolist() == [IMAGE_START + CODE_POSITION[c] for c in range(N_CODES)]
        assert not torch.equal(bpe, codes + IMAGE_START)
        assert torch.equal(v.bpe_to_code(bpe), codes)


def test_vocabulary_errors_name_the_token():
    names = vocabulary_map()
    with pytest.raises(VocabularyError, match="no token '<reserved08799>'"):
        LuminaVocab.from_names({k: i for k, i in names.items() if k != "<reserved08799>"})
    gap = dict(names)
    gap["<s>"], gap["IMGIMGBZ"] = 0, 40  # one image token moved out of the range
    with pytest.raises(VocabularyError, match="not one contiguous id range"):
        LuminaVocab.from_names(gap)
    with pytest.raises(VocabularyError, match="no size token for 320 px"):
        LuminaVocab.from_names(names).size_id(10)


def test_prompt_template_as_the_original(tiny):
    enc = LuminaPromptEncoder.from_folder(tiny.lumina)
    names = vocabulary_map()
    ids = enc.encode_one("a red fox in snow", "96x64")
    words = ["Generate", "an", "image", "of", "96x64", "according", "to", "the", "following", "prompt", ":",
             "a", "red", "fox", "in", "snow"]
    # BOS, the template's words, end of turn, then begin-of-image + height (64 px = 2) + width (96 px = 3)
    assert ids == [0] + [names[w] for w in words] + [names["<reserved08706>"], names["<racm3:break>"],
                                                      names["<reserved08802>"], names["<reserved08803>"]]
    assert enc.image_prefix(ImageSize.parse("96x64")) == ids[-3:]
    batch = enc.encode(["a red fox", "blue cat sits on the mat"], ["64x64", (64, 96)])
    assert batch[1][-2:] == [names["<reserved08803>"], names["<reserved08802>"]]  # height 96, width 64
    assert len(batch[0]) != len(batch[1])


def test_prompt_and_size_errors(tiny):
    enc = LuminaPromptEncoder.from_folder(tiny.lumina, max_tokens=20)
    with pytest.raises(PromptError, match="empty prompt"):
        enc.encode_one("  ", 64)
    with pytest.raises(PromptError, match="at most 20"):
        enc.encode_one("a red fox in snow under the big blue sky", 64)
    with pytest.raises(PromptError, match="multiples of 32"):
        ImageSize.parse("100x64")
    with pytest.raises(PromptError, match="WIDTHxHEIGHT"):
        ImageSize.parse("big")
    assert ImageSize.parse("768x512").grid == (32, 48) and ImageSize.parse(768).grid == (48, 48)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        LuminaPromptEncoder.from_folder(tiny.lumina / "nowhere")


def test_config_checks(tiny, tmp_path):
    assert read_hf_config(tiny.lumina)["architectures"] == ["ChameleonXLLMXForConditionalGeneration"]
    assert read_hf_config(tiny.hf)["architectures"] == ["ChameleonForConditionalGeneration"]
    with pytest.raises(LuminaFolderError, match="config.json not found"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(LuminaFolderError, match="not a Chameleon"):
        read_hf_config(tmp_path)


def test_key_map_covers_every_weight_and_qk_norm_repeats(tiny):
    from safetensors import safe_open
    keys = set()
    for f in sorted(tiny.lumina.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys |= set(st.keys())
    mapped = set()
    for v in key_map(2, 4).values():
        mapped |= set(v.keys if isinstance(v, Source) else v if isinstance(v, list) else [v])
    assert mapped == keys  # every published tensor has a lineray home, nothing is invented
    row = torch.randn(1, 16)
    assert torch.equal(repeat_over_heads(row, 4), row.expand(4, 16))
    per_head = torch.randn(4, 16)
    assert torch.equal(repeat_over_heads(per_head, 4), per_head)
    with pytest.raises(LuminaFolderError, match="does not fit 4 heads"):
        repeat_over_heads(torch.randn(3, 16), 4)


def test_both_layouts_read_the_same_tensors_under_lineray_names(tiny):
    hf = open_weights(tiny.hf, 2, 4)
    published = open_weights(tiny.lumina, 2, 4)
    assert sorted(hf.keys()) == sorted(published.keys())
    assert "model.vqmodel" in hf.skipped and not published.skipped  # transformers keeps the VQ encoder
    assert published.reader.shape("model.layers.0.self_attn.q_norm.weight") == (1, 16)  # Lumina's [1, head_dim]
    assert hf.reader.shape("model.layers.0.self_attn.q_norm.weight") == (4, 16)
    for key in hf.keys():
        assert hf.shape(key) == published.shape(key)
        assert torch.equal(hf.read(key), published.read(key)), key
    assert published.shape("layers.1.attention.k_norm.bias") == (4, 16)
    # a tensor-parallel rank's rows: heads 2..3 of the norm, the k rows of the fused qkv
    torch.testing.assert_close(published.read("layers.1.attention.k_norm.bias", rows=slice(2, 4)),
                               tiny.model.model.layers[1].self_attn.k_norm.bias[2:4].detach())
    torch.testing.assert_close(published.read("layers.0.attention.wqkv.weight", rows=slice(64, 96)),
                               tiny.model.model.layers[0].self_attn.k_proj.weight[:32].detach())


def test_tokenizer_json_is_parsed_once_and_a_broken_one_is_named(tmp_path):
    """The prompt encoder and the vocabulary share one parsed tokenizer.json (5.6 MB for the 768 model); a file
    that does not parse is a one-line error naming it, for either family."""
    import shutil

    from lineray.models.janus.prompt import PromptEncoder, PromptError
    from lineray.models.lumina.folder import LuminaFolderError, read_vocab
    from lineray.models.lumina.prompt import LuminaPromptEncoder
    from lineray.models.tokenizer_file import read_tokenizer
    from lumina_fixtures import write_tokenizer
    write_tokenizer(tmp_path / "tokenizer.json")
    assert LuminaPromptEncoder.from_folder(tmp_path).tokenizer is read_tokenizer(tmp_path / "tokenizer.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(PromptError, match=r"cannot read .*broken/tokenizer.json: ") as e:
        PromptEncoder.from_folder(broken)
    assert len(str(e.value).splitlines()) == 1
    (broken / "config.json").write_text(json.dumps({"architectures": ["ChameleonForConditionalGeneration"],
                                                   "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                                                   "intermediate_size": 8, "vocab_size": 96}))
    with pytest.raises(LuminaFolderError, match=r"cannot read .*broken/tokenizer.json: "):
        read_vocab(broken)
