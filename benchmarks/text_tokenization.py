"""Where text prompts are tokenized: in the prompt reader (where rows are checked) or in the generate stage.

A prompt row has to be tokenized to be checked (a prompt longer than the model's context is rejected
before it reaches a generator), so the reader tokenizes every row anyway. The question is whether the
generators get the ids from it (what lineray does) or tokenize the text again themselves. A generate
stage is synchronous: whatever it does besides generating, its device waits for. Measured here:

1. generator: seconds per batch of the real GenerateStage (janus-tiny, random weights, 6 x 6 tokens, CFG)
   given the ids, and the seconds the same stage would add tokenizing that batch's texts first (a
   32k-token byte-level BPE with Janus-Pro's template: PromptEncoder.encode on the batch). Both in one
   process, alternating rounds; the share is tokenize / (generate + tokenize).
2. reader: rows/s of the reader's row checks (sources.iter_shards, JSONL parse + checks) with the BPE
   tokenizer and with a stand-in encoder that returns fixed ids: the reader's ceiling either way.

The tokenizer is trained here on the Python standard library's sources (the real Janus-Pro tokenizer,
100k tokens, cannot be downloaded; encode time grows with the text, little with the vocabulary).
Prompts are 8-40 random words, like COCO captions. Timings on this shared 2-core machine are noisy.

    python benchmarks/text_tokenization.py [--batches 16,64] [--rows 20000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import machine, print_table, write_csv  # noqa: E402

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<|▁pad▁|>", "<|User|>",
            "<|Assistant|>", "<begin_of_image>", "<end_of_image>"]


def train_bpe(folder: Path, vocab: int = 32000, corpus_mib: int = 16) -> Path:
    """A byte-level BPE tokenizer.json trained on the standard library's .py files, with Janus's specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(texts[-1])
        if size > corpus_mib * 2**20:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ("a an the red blue small large old young cat dog fox horse bird house street mountain river city "
             "painting photo of on in at with under near during sunset night snow rain forest beach portrait "
             "woman man child boat train bicycle table window light shadow golden misty cinematic detailed").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 40))) for _ in range(n)]


def generator_side(batches: list[int], rounds: int, bpe_folder: Path) -> list[dict]:
    import numpy as np
    import torch

    from janus_fixtures import write_tokenizer
    from lineray.models.janus.folder import prompt_encoder
    from lineray.pipelines import JobConfig
    from lineray.pipelines.stages import GenerateStage

    torch.set_num_threads(1)  # a generate actor asks 1 CPU
    tiny_tok = Path(tempfile.mkdtemp()) / "tiny"
    tiny_tok.mkdir()
    write_tokenizer(tiny_tok)
    model = dict(preset="janus-tiny", checkpoint="random", tokenizer=str(tiny_tok),
                 vq_config=dict(codebook_size=32, ch=32, z_channels=32))
    job = JobConfig.from_dict(dict(source="-", output="-", model=model, sampling=dict(cfg_scale=5.0)))
    stage = GenerateStage(job.replica_config)
    tiny, bpe = job.model.prompt_encoder(), prompt_encoder(bpe_folder, max_tokens=256)
    rows = []
    for b in batches:
        texts = captions(b, seed=b)
        ids = tiny.encode([" ".join(t.split()[:8]) for t in texts])  # janus-tiny's context is 32 tokens
        col = np.empty(b, dtype=object)
        col[:] = [np.asarray(i, dtype=np.int32) for i in ids]
        batch = {"seed": np.arange(b), "cfg_scale": np.full(b, 5.0), "prompt_ids": col,
                 "text": np.asarray(texts, dtype=object)}
        stage(batch)  # warm-up
        gen, tok = [], []
        for _ in range(rounds):  # alternating: the two measurements see the same machine load
            t0 = time.perf_counter()
            stage(batch)
            gen.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            bpe.encode(list(batch["text"]))
            tok.append(time.perf_counter() - t0)
        g, t = float(np.median(gen)), float(np.median(tok))
        rows.append({"batch": b, "generate_ms": 1e3 * g, "tokenize_ms": 1e3 * t,
                     "tokenize_us_per_prompt": 1e6 * t / b, "share_if_in_generator": t / (g + t)})
    return rows


class FixedIds:
    """Stand-in encoder: no tokenization (the reader's cost without it)."""

    def encode(self, texts):
        return [[1, 2, 3] for _ in texts]


def reader_side(rows: int, bpe_folder: Path) -> list[dict]:
    from lineray.models.janus.folder import prompt_encoder
    from lineray.pipelines import PromptSource, RowRules, iter_shards

    src = Path(tempfile.mkdtemp()) / "prompts.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{i:08d}", "prompt": t}) + "\n"
                           for i, t in enumerate(captions(rows, seed=1))))
    out = []
    for name, encoder in (("with tokenizer (lineray)", prompt_encoder(bpe_folder, max_tokens=256)),
                          ("stand-in, no tokenizer", FixedIds())):
        rules = RowRules(model_type="text", num_classes=0, caption_tokens=0, caption_dim=0, has_text_encoder=False,
                         default_cfg=5.0, job_seed=0, max_count=1000, max_prefix_len=256, encoder=encoder)
        t0 = time.perf_counter()
        images = sum(len(s.images) for s in iter_shards(PromptSource(str(src)), rules, shard_rows=1024))
        seconds = time.perf_counter() - t0
        assert images == rows
        out.append({"reader": name, "rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
                    "us_per_row": 1e6 * seconds / rows})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="16,64", help="generation batch sizes")
    p.add_argument("--rows", type=int, default=20000, help="prompt rows for the reader's throughput")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per batch size (median)")
    p.add_argument("--csv", default="benchmarks/results/text_tokenization.csv")
    args = p.parse_args()
    print(machine())
    t0 = time.perf_counter()
    bpe = train_bpe(Path(tempfile.mkdtemp()) / "bpe")
    print(f"trained a 32k byte-level BPE in {time.perf_counter() - t0:.1f} s")
    gen = generator_side([int(b) for b in args.batches.split(",")], args.rounds, bpe)
    print_table(gen, ["batch", "generate_ms", "tokenize_ms", "tokenize_us_per_prompt", "share_if_in_generator"],
                "generator: one GenerateStage batch (janus-tiny, 36 image tokens, CFG, 1 thread) vs tokenizing "
                "its prompts (32k BPE + template)")
    read = reader_side(args.rows, bpe)
    print_table(read, ["reader", "rows", "seconds", "rows_per_s", "us_per_row"],
                "reader: row checks (iter_shards: JSONL parse, checks, seeds) with and without tokenization")
    write_csv([{"part": "generator", **r} for r in gen] + [{"part": "reader", **r} for r in read], args.csv)
    print(f"\nwrote {args.csv}")


if __name__ == "__main__":
    main()
