"""Shared pieces of the pipeline tests: a moto S3 server on loopback, a tiny fast model, prompt writers."""
from __future__ import annotations

import io
import json
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# GPT-tiny with random weights and a small random VQ decoder: 4x4 tokens -> 64x64 px images.
TINY_MODEL = dict(preset="GPT-tiny", checkpoint="random", decoder="random", grid_size=4,
                  vq_config=dict(codebook_size=256, ch=32, z_channels=32))
IMAGE_PX = 64


# A Janus-shaped tiny model (janus-tiny: 2 layers, width 64, 6x6 tokens -> 96 px) with random weights; its
# tokenizer (`tokenizer` key) is a folder with janus_fixtures.write_tokenizer's tiny tokenizer.json.
TINY_JANUS = dict(preset="janus-tiny", checkpoint="random", vq_config=dict(codebook_size=32, ch=32, z_channels=32))


def tiny_job(source: str, output: str, **kw) -> dict:
    """A job dict on the tiny model; kw overrides any setting. Batches are auto: 4 images (the cap) fit."""
    job = dict(source=source, output=output, model=dict(TINY_MODEL), sampling=dict(cfg_scale=2.0, top_k=0),
               replicas=1, max_batch_size=4, shard_rows=4, progress_interval_s=1.0,  # batch_size: auto
               resources=dict(generate_cpus=0.5, decode_cpus=0.25, png_cpus=0.25, read_cpus=0.25))
    job.update(kw)
    return job


class S3Server:
    """moto's S3 on 127.0.0.1 (port chosen by the OS), with s3fs options that reach it."""

    def __init__(self):
        from moto.server import ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        # No region_name: s3fs + moto then fail to create buckets (DESIGN.md section 5).
        self.options = {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}

    def fs(self):
        import s3fs
        return s3fs.S3FileSystem(skip_instance_cache=True, **self.options)

    def stop(self):
        self.server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jsonl_bytes(rows: list) -> bytes:
    """Rows as JSONL; a str row is written as is (for malformed lines)."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def csv_bytes(rows: list[dict], columns: list[str]) -> bytes:
    import csv
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in columns})
    return buf.getvalue().encode()


def parquet_bytes(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def read_dataset(fs, root: str) -> pa.Table:
    """Every committed data file of an output, as one table."""
    import pyarrow.dataset as pads
    return pads.dataset(f"{root}/data", filesystem=fs, format="parquet").to_table()


# -- fixtures (import them into a test module to use them) ---------------------------------------
@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """A private local Ray for the module: loopback only, 4 logical CPUs (the stages ask for fractions)."""
    import ray

    from lineray.cluster.local import ensure_ray
    started = ensure_ray(num_cpus=4, temp_dir=str(tmp_path_factory.mktemp("ray", numbered=True)))
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with an empty bucket named "bucket"."""
    server = S3Server()
    server.fs().makedirs("bucket", exist_ok=True)  # moto keeps state per process: a second server sees it
    yield server
    server.stop()


def put(s3: S3Server, key: str, data: bytes) -> str:
    with s3.fs().open(f"bucket/{key}", "wb") as f:
        f.write(data)
    return f"s3://bucket/{key}"
