"""The job's Ray Data stream: tickets -> read shards -> repartition -> [encode text] -> generate -> decode -> PNG.

Every stage asks what the resource plan (pipelines.plan) gave it. Shards are cut
into batch-sized blocks (the repartition) so each generation task is one batch and
the replicas share the work evenly. Generate / decode / PNG are separate stages
(actor pools for the models, tasks for PNG), so the generators never wait on pixels.
"""
from __future__ import annotations

import warnings

from lineray.pipelines.plan import ResourcePlan
from lineray.pipelines.prompts import RowRules
from lineray.pipelines.rejects import RejectCounter
from lineray.pipelines.sink import Output
from lineray.pipelines.sources import PromptSource


def build_dataset(job, plan: ResourcePlan, source: PromptSource, out: Output, rules: RowRules, skip: frozenset,
                  tickets: int, monitor):
    import ray
    from ray.data import ActorPoolStrategy

    from lineray.pipelines.reader import ShardReader
    from lineray.pipelines.stages import DecodeStage, GenerateStage, encode_png
    from lineray.pipelines.text import TextEncodeStage

    here = None
    if _is_local(source.filesystem()) or out.is_local:
        # Local paths exist only on this node: keep the reader (and its error/commit writes) here.
        here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    budget = RejectCounter(job.max_error_fraction, job.error_check_rows)
    ds = ray.data.from_items([{"ticket": i} for i in range(tickets)], override_num_blocks=tickets).map_batches(
        ShardReader, fn_constructor_args=(source, rules, job.shard_rows, out, skip, monitor, budget, job.source),
        batch_size=1, batch_format="pyarrow", compute=ActorPoolStrategy(size=1), num_cpus=plan.read_cpus,
        label_selector=here)
    ds = ds.repartition(target_num_rows_per_block=job.batch_size)
    # Ray Data sizes pools from task counts and warns when an input looks small; the blocks above suffice.
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
    if plan.stage("text") is not None:
        ds = ds.map_batches(TextEncodeStage, fn_constructor_args=(
                                job.text_encoder, job.text_max_tokens or rules.caption_tokens, rules.caption_dim,
                                plan.text_device, monitor),
                            batch_size=job.batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=1),
                            num_cpus=plan.text_cpus, num_gpus=plan.text_gpus)
    ds = ds.map_batches(GenerateStage, fn_constructor_args=(job.replica_config, monitor), batch_size=job.batch_size,
                        batch_format="numpy", compute=ActorPoolStrategy(size=plan.replicas),
                        num_cpus=plan.generate_cpus, num_gpus=plan.generate_gpus)
    ds = ds.map_batches(DecodeStage, fn_constructor_args=(job.model, plan.decode_device, monitor),
                        batch_size=job.decode_batch_size or job.batch_size, batch_format="numpy",
                        compute=ActorPoolStrategy(size=job.resources.decoders), num_cpus=plan.decode_cpus,
                        num_gpus=plan.decode_gpus)
    return ds.map_batches(encode_png, batch_size=None, batch_format="numpy", num_cpus=plan.png_cpus)


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem
    return isinstance(fs, LocalFileSystem)
