"""The GPU benchmarks' shared preamble: Hugging Face offline (the GPU machines have no network), no tokenizer
threads, and the repository and this folder importable. Import it before anything that imports transformers."""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _path in (ROOT / "benchmarks", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
