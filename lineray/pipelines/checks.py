"""Checks a job passes before Ray starts or the output is touched: settings, names, and a look at the first rows.

A job that cannot work fails here with a message naming the setting, and a prompt
file whose rows are mostly rejected (a `class_label` column where `class` is
expected) is refused after reading its first `error_check_rows` rows, before a
single file is written.
"""
from __future__ import annotations


from lineray.pipelines.config import JobConfig, JobConfigError
from lineray.pipelines.prompts import RowRules
from lineray.pipelines.rejects import RejectCounter, TooManyBadRows
from lineray.pipelines.sources import PromptSource, iter_shards


def model_name(job: JobConfig) -> str:
    return job.model.name


def class_names(job: JobConfig) -> list[str] | None:
    """The model's class names (bundled models list them), for the output's ClassLabel; None if unknown."""
    if not job.model.is_bundled or job.model.config().model_type != "c2i":
        return None
    from lineray.models.bundles import bundle_module
    return list(bundle_module(getattr(job.model, "bundle", None) or "digits").CLASS_NAMES)


def cache_policy_name(job: JobConfig) -> str:
    return job.model.config().cache_plan(job.cache).describe()


def check_job(job: JobConfig) -> RowRules:
    """Fail early, before Ray starts, on settings that cannot work (no weights are loaded)."""
    if job.source.startswith("memory://") or job.output.startswith("memory://"):
        raise JobConfigError("memory:// exists only inside one process; Ray workers cannot see it: "
                             "use a local path or object storage")
    cfg = job.model.config()
    if job.tp not in cfg.valid_tp_sizes():
        raise JobConfigError(f"tp={job.tp} does not fit {job.model.preset}: valid sizes are "
                             f"{', '.join(map(str, cfg.valid_tp_sizes()))}")
    cache_policy_name(job)  # CacheConfigError names a bad budget
    if cfg.model_type == "c2i" and job.text_encoder:
        raise JobConfigError("text_encoder is set but the model is class-conditional (c2i)")
    if cfg.model_type == "text" and (job.text_encoder or job.text_max_tokens is not None):
        raise JobConfigError(f"text_encoder / text_max_tokens are for LlamaGen t2i caption features; "
                             f"{job.model.preset} tokenizes its own prompts (the `prompt` column)")
    if cfg.model_type == "t2i" and job.text_max_tokens is not None and not 1 <= job.text_max_tokens <= cfg.cls_token_num:
        raise JobConfigError(f"text_max_tokens must be 1..{cfg.cls_token_num} (the model's caption tokens), "
                             f"got {job.text_max_tokens}")
    return RowRules.for_job(job)


def check_first_rows(job: JobConfig, source: PromptSource, rules: RowRules, skip: frozenset = frozenset()) -> None:
    """Read up to error_check_rows rows of shards still to do; TooManyBadRows if the error budget is already blown
    (or every row of a shorter input is rejected)."""
    budget = RejectCounter(job.max_error_fraction, job.error_check_rows)
    for shard in iter_shards(source, rules, job.shard_rows):
        if shard.key in skip:
            continue
        budget.add(shard.rows, shard.errors)
        if budget.rows >= job.error_check_rows:
            break
    if budget.exceeded or budget.all_rejected:
        raise TooManyBadRows(budget.message(job.source))
