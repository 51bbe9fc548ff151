"""distill-bench: end-to-end energy accounting of LLM distillation pipelines."""
__version__ = "0.1.0"
