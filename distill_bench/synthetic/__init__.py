"""Synthetic-data pipeline, teacher side: sharded generation (``stage.generate_shard``), filters
(``filters.apply_filters``) and merge (``stage.merge_shards``); artifact ids in ``ids`` (pure Python, used by the
Snakefile at parse time). Nothing heavy is imported here so ``distill_bench.synthetic.ids`` stays torch-free."""
