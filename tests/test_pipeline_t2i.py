"""Text-to-image rows: a tiny random T5 encoder (built from a config, nothing downloaded), precomputed embeddings."""
from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pipeline_helpers import IMAGE_PX, TINY_MODEL, jsonl_bytes, ray_session, tiny_job  # noqa: F401

from lineray.pipelines import JobConfig, run_job
from lineray.pipelines.stages import GenerateStage
from lineray.pipelines.text import T5TextEncoder, TextEncodeStage

pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)

CAPTION_DIM = 2048  # LlamaGen t2i presets read FLAN-T5-XL features; the tiny T5 has the same width
WORDS = ["a", "red", "cat", "two", "blue", "dogs", "on", "the", "moon"]
T2I_MODEL = dict(TINY_MODEL, model_type="t2i")


@pytest.fixture(scope="module")
def t5_path(tmp_path_factory):
    """A 1-layer random T5 encoder with a word-level tokenizer, saved like a Hugging Face model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    path = tmp_path_factory.mktemp("tiny-t5")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=CAPTION_DIM, d_kv=8, num_heads=2, d_ff=32,
                            num_layers=1)).save_pretrained(path)
    return str(path)


def test_text_encoder_and_caption_layout(t5_path):
    enc = T5TextEncoder(t5_path, max_tokens=120)
    a, b = enc.encode(["a red cat", "two blue dogs on the moon"])
    assert a.shape == (3, CAPTION_DIM) and b.shape == (6, CAPTION_DIM) and a.dtype == np.float32

    stage = TextEncodeStage(t5_path, max_tokens=120, caption_dim=CAPTION_DIM)
    given = np.full(4 * CAPTION_DIM, 0.5, np.float32)
    emb = np.empty(2, dtype=object)
    emb[0], emb[1] = np.zeros(0, np.float32), given
    batch = {"text": np.array(["a red cat", ""], dtype=object), "embedding": emb,
             "embedding_tokens": np.array([0, 4], np.int32)}
    out = stage(batch)
    assert out["embedding_tokens"].tolist() == [3, 4]  # text encoded; the precomputed row kept
    assert np.array_equal(out["embedding"][1], given)

    # The generation stage puts each row's tokens at the end of the 120 slots (LlamaGen's layout).
    job = JobConfig.from_dict(tiny_job("s", "o", model=T2I_MODEL, text_encoder=t5_path))
    gen = GenerateStage(job.replica_config)
    cond = gen.condition(out, np.array([0, 1]))
    assert cond.captions.shape == (2, 120, CAPTION_DIM)
    assert cond.caption_mask.sum(1).tolist() == [3, 4] and cond.caption_mask[:, -3:].all()
    assert torch.equal(cond.captions[1, -4:], torch.full((4, CAPTION_DIM), 0.5))
    assert not cond.captions[0, :-3].any()

    # Different captions, same seed: different images (the condition reaches the model).
    same_seed = {"cfg_scale": np.array([2.0, 2.0]), "seed": np.array([3, 3])}
    tokens = gen(dict(out, **same_seed))["tokens"]
    assert tokens.shape == (2, 16) and not np.array_equal(tokens[0], tokens[1])


def test_t2i_job_with_text_and_embedding_rows(ray_session, t5_path, tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"id": "cat", "text": "a red cat"}, {"id": "dogs", "text": "two blue dogs", "count": 2},
            {"id": "emb", "text": "precomputed", "embedding": rng.normal(size=(3, CAPTION_DIM)).round(3).tolist()},
            {"id": "bad", "embedding": [[0.0] * 7] * 2}]
    src = tmp_path / "captions.jsonl"
    src.write_bytes(jsonl_bytes(rows))
    out = tmp_path / "out"
    job = JobConfig.from_dict(tiny_job(str(src), str(out), model=T2I_MODEL, text_encoder=t5_path))
    summary = run_job(job, progress=False)
    assert (summary.images, summary.errors) == (4, 1)
    table = pq.read_table(out / "data").to_pylist()
    assert sorted((r["id"], r["image_index"]) for r in table) == [("cat", 0), ("dogs", 0), ("dogs", 1), ("emb", 0)]
    assert {r["text"] for r in table} == {"a red cat", "two blue dogs", "precomputed"}
    assert all(r["label"] is None for r in table)
    for r in table:
        assert Image.open(io.BytesIO(r["image"]["bytes"])).size == (IMAGE_PX, IMAGE_PX)
    (error,) = pq.read_table(out / "errors").to_pylist()
    assert error["id"] == "bad" and error["reason"].startswith("wrong embedding shape [2, 7]")
