"""The Janus-Pro prompt: template, BOS first, <begin_of_image> last, ids read from tokenizer.json."""
import pytest
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from janus_fixtures import BOI, BOS, CFG_PAD, PROMPTS, janus, prompt_ids  # noqa: F401 (janus: the session fixture)
from lineray.models.janus.folder import FolderError, check_folder
from lineray.models.janus.prompt import PromptEncoder, PromptError


def test_prompts_follow_the_janus_pro_template(janus):
    enc = PromptEncoder.from_folder(janus.tf_dir)
    assert (enc.bos_id, enc.boi_id, enc.cfg_pad_id) == (BOS, BOI, CFG_PAD)
    assert enc.tokenizer.token_to_id("<|▁pad▁|>") != enc.cfg_pad_id  # the full-width pad, not the ASCII one
    ids = enc.encode(PROMPTS)
    assert ids == [prompt_ids(p) for p in PROMPTS]  # built by hand from the vocabulary
    for row in ids:
        assert row[0] == BOS and row[-1] == BOI and row.count(BOS) == 1  # no second BOS from the post-processor
    text = enc.tokenizer.decode(ids[0], skip_special_tokens=False)
    assert text == "<｜begin▁of▁sentence｜> <|User|> : a red fox in the snow \n\n <|Assistant|> : <begin_of_image>"
    assert [enc.encode_one(p) for p in PROMPTS] == ids
    assert enc.encode_one(f"  {PROMPTS[0]} \n") == ids[0]  # stripped, as the original's template does


def test_special_ids_are_read_from_the_tokenizer_not_assumed():
    words = ["[UNK]", ":", "\n\n", "hello"]
    specials = ["<|User|>", "<|Assistant|>", "<begin_of_image>", "<｜begin▁of▁sentence｜>", "<｜▁pad▁｜>", "<s>"]
    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(words + specials)}, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    enc = PromptEncoder(tok)
    assert (enc.bos_id, enc.boi_id, enc.cfg_pad_id) == (7, 6, 8)
    assert PromptEncoder(tok, bos_token="<s>").encode_one("hello")[0] == 9  # BOS as tokenizer_config names it
    ids = enc.encode_one("hello")
    assert ids[0] == 7 and ids[-1] == 6 and 3 in ids


def test_bad_prompts_are_named(janus):
    enc = PromptEncoder.from_folder(janus.tf_dir, max_tokens=12)
    for empty in ("", "   \n"):
        with pytest.raises(PromptError, match="empty prompt"):
            enc.encode_one(empty)
    with pytest.raises(PromptError, match=r"prompt 1 is empty"):
        enc.encode(["a cat", ""])
    assert len(enc.encode_one("a red fox")) == 10
    long = "a red fox in the snow on the moon"
    with pytest.raises(PromptError, match=r"prompt 'a red fox in the snow on the moon' is too long: 16 tokens "
                                          r"with the template, this model takes at most 12") as e:
        enc.encode([long])
    assert "\n" not in str(e.value)
    with pytest.raises(PromptError, match=r"'a red fox in the snow on the moon a red …' is too long"):
        enc.encode_one(long + " " + long)
    assert isinstance(e.value, ValueError)


def test_tokenizer_problems_name_the_file_and_token(janus, tmp_path):
    with pytest.raises(PromptError, match=r"no tokenizer\.json"):
        PromptEncoder.from_folder(tmp_path)
    (tmp_path / "config.json").write_text((janus.tf_dir / "config.json").read_text())
    with pytest.raises(FolderError, match=r"no tokenizer\.json"):
        check_folder(tmp_path)
    tok = Tokenizer(WordLevel({"[UNK]": 0, "<｜begin▁of▁sentence｜>": 1, "<｜▁pad▁｜>": 2}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(PromptError, match=r"tokenizer\.json has no begin-of-image token '<begin_of_image>'"):
        PromptEncoder.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(PromptError, match=r"cannot read .*tokenizer\.json"):
        PromptEncoder.from_folder(tmp_path)
