"""The streaming batch job: prompt files at any fsspec URL in, a Parquet image dataset out.

    from lineray.pipelines import JobConfig, run_job
    summary = run_job(JobConfig.from_yaml("configs/jobs/digits.yaml"))

See job.py for the stages, sink.py for the output layout, commit and resume.
"""
from lineray.pipelines.config import JobConfig, JobConfigError, StageResources
from lineray.pipelines.job import run_job
from lineray.pipelines.monitor import JobStalled
from lineray.pipelines.plan import PlanError
from lineray.pipelines.progress import JobSummary
from lineray.pipelines.rejects import TooManyBadRows
from lineray.pipelines.resume import ForeignOutput
from lineray.pipelines.storage import StorageError
from lineray.pipelines.prompts import RowError, RowRules, image_seed
from lineray.pipelines.sink import IMAGE_SCHEMA, PROMPT_IMAGE_SCHEMA, Output
from lineray.pipelines.sources import PromptSource, SourceError, iter_shards

__all__ = ["JobConfig", "JobConfigError", "StageResources", "JobSummary", "run_job", "RowError", "RowRules",
           "JobStalled", "PlanError", "TooManyBadRows", "ForeignOutput", "StorageError",
           "image_seed", "IMAGE_SCHEMA", "PROMPT_IMAGE_SCHEMA", "Output", "PromptSource", "SourceError", "iter_shards"]
