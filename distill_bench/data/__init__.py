"""Datasets in the common record schema (id, prompt, response, answer, source): embedded task, real-dataset
preprocessors, and the dataset-directory IO + content hash that downstream caches key on."""
from distill_bench.data.io import SCHEMA_COLUMNS, dataset_content_hash, load_dataset_dir
from distill_bench.data.task import generate_task, normalize_prompt

__all__ = ["SCHEMA_COLUMNS", "dataset_content_hash", "generate_task", "load_dataset_dir", "normalize_prompt"]
