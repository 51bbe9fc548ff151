"""Workflow configuration: validation with key paths, defaults, experiment grid and the run plan.

Pure Python (PyYAML + jsonschema): the Snakefile imports it at parse time, so nothing here may import torch.
"""
from distill_bench.config.load import ConfigError, load_config, validate_config
from distill_bench.config.plan import Experiment, Plan, build_plan

__all__ = ["ConfigError", "load_config", "validate_config", "Experiment", "Plan", "build_plan"]
