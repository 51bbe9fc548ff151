"""Generation settings and per-sample results shared by every backend (see docs/ARCHITECTURE.md)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from distill_bench.defaults import allowed_values, section_defaults

# defaults and allowed values: the schema's `generation` block (distill_bench/config/workflow.schema.yaml)
DEFAULTS = section_defaults("generation")
BACKENDS = allowed_values("generation", "backend")
OVERFLOW_POLICIES = allowed_values("generation", "prompt_overflow")
HF_DECODE = allowed_values("generation", "hf_decode")
HF_PREFILL = allowed_values("generation", "hf_prefill")
# config spellings used by other sections (synthetic.samples_per_prompt) -> field name
ALIASES = {"samples_per_prompt": "num_samples"}


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode. ``temperature == 0`` means greedy.

    ``max_prompt_tokens``: templated prompts longer than this are handled by ``prompt_overflow``: ``truncate``
    keeps the last ``max_prompt_tokens`` tokens (left truncation: the generation prompt at the end survives),
    ``drop`` skips the prompt. Either way the result says so (``GenerationResult.truncated_tokens`` /
    ``dropped``) and nothing crashes. ``None`` means "the model's context minus ``max_new_tokens``" when the model
    config states its context length, else unlimited.
    ``continuous_batching``: hf backend only, use transformers' ``generate_batch`` (paged continuous batching)
    instead of static left-padded batches; off by default (see ``hf_backend`` for why).
    ``hf_decode`` (hf backend, static batches): ``eager`` = HF ``generate`` with the dynamic cache (host-bound on
    GPU); ``hf_static`` = HF ``generate`` with a static cache and its auto-compile (``CompileConfig`` fullgraph,
    reduce-overhead), batches padded to one row count and one cache length per call so it compiles once;
    ``graph`` = our static-cache loop with the decode step in a CUDA graph (``generation.static_decode``; eager on
    CPU); ``auto`` (default) = ``graph`` on CUDA, ``eager`` elsewhere. Greedy output equals ``eager`` (tests, CPU).
    H100, 1B, batch 64: eager 1,429 tok/s, graph 11,788 tok/s after ~20 s compile (docs/BENCHMARKS.md).
    ``hf_prefill`` (``graph`` only): ``packed`` = the batch's prompts end to end without padding, attention inside
    each prompt (``generation.packed_prefill``); ``eager`` = the model's forward over the left-padded batch;
    ``auto`` (default) = ``packed`` for plain causal llama/olmo/olmo2/qwen2 models in bf16/fp16 where PyTorch's
    varlen kernel runs (CUDA), else ``eager``. Greedy output equals ``eager`` generate in fp32 (tests, CPU).
    ``dtype``: vllm only (``auto`` lets vLLM choose); the hf backend uses the model as loaded.
    """

    backend: str = DEFAULTS["backend"]
    batch_size: int = DEFAULTS["batch_size"]
    max_new_tokens: int = DEFAULTS["max_new_tokens"]
    temperature: float = DEFAULTS["temperature"]
    top_p: float = DEFAULTS["top_p"]
    num_samples: int = DEFAULTS["num_samples"]
    seed: int = DEFAULTS["seed"]
    max_prompt_tokens: int | None = DEFAULTS["max_prompt_tokens"]
    prompt_overflow: str = DEFAULTS["prompt_overflow"]
    continuous_batching: bool = DEFAULTS["continuous_batching"]
    hf_decode: str = DEFAULTS["hf_decode"]
    hf_prefill: str = DEFAULTS["hf_prefill"]
    dtype: str = DEFAULTS["dtype"]

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"generation setting '{key}' {why} (got {getattr(self, key)!r})")

        if self.backend not in BACKENDS:
            raise bad("backend", f"must be one of {', '.join(BACKENDS)}")
        for key in ("batch_size", "max_new_tokens", "num_samples"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(key, "must be an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise bad("seed", "must be an integer")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise bad("temperature", "must be a number >= 0")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if self.max_prompt_tokens is not None and (
                isinstance(self.max_prompt_tokens, bool) or not isinstance(self.max_prompt_tokens, int)
                or self.max_prompt_tokens < 1):
            raise bad("max_prompt_tokens", "must be null or an integer >= 1")
        if self.prompt_overflow not in OVERFLOW_POLICIES:
            raise bad("prompt_overflow", f"must be one of {', '.join(OVERFLOW_POLICIES)}")
        if not isinstance(self.continuous_batching, bool):
            raise bad("continuous_batching", "must be true or false")
        if self.hf_decode not in HF_DECODE:
            raise bad("hf_decode", f"must be one of {', '.join(HF_DECODE)}")
        if self.hf_prefill not in HF_PREFILL:
            raise bad("hf_prefill", f"must be one of {', '.join(HF_PREFILL)}")
        if self.temperature == 0 and self.num_samples > 1:
            raise bad("num_samples", "> 1 needs temperature > 0 (greedy samples would all be identical)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "generation",
                  ignore: tuple[str, ...] = ()) -> "GenerationSettings":
        """Build from a config section; unknown keys are an error naming ``<where>.<key>`` unless in ``ignore``."""
        if not isinstance(d, Mapping):
            raise TypeError(f"{where} must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in ignore:
                continue
            name = ALIASES.get(key, key)
            if name not in names:
                raise ValueError(f"unknown generation setting '{where}.{key}'; known: {', '.join(sorted(names))}")
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


@dataclass(frozen=True)
class GenerationResult:
    """One generated sample. Token counts are exact: ``prompt_tokens`` excludes padding, ``generated_tokens``
    counts real generated tokens up to and including the first EOS (never padding). ``finished`` is True when EOS
    was produced within ``max_new_tokens``. A ``dropped`` prompt (too long, ``prompt_overflow: drop``) has no text
    and zero generated tokens; ``truncated_tokens`` is how many prompt tokens left truncation removed."""

    prompt_index: int
    sample_index: int
    text: str
    prompt_tokens: int
    generated_tokens: int
    finished: bool
    dropped: bool = False
    truncated_tokens: int = 0
    token_ids: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["token_ids"] = list(self.token_ids)
        return d


def summarize(results: list[GenerationResult]) -> dict[str, int]:
    """Totals a stage records: token counts plus how many prompts were truncated or dropped."""
    prompts = {}
    for r in results:
        prompts.setdefault(r.prompt_index, r)
    return {
        "samples": len(results),
        "generated_tokens": sum(r.generated_tokens for r in results),
        # the prompt is processed once per prompt (samples share it via num_return_sequences / vLLM prefix reuse)
        "input_tokens": sum(r.prompt_tokens for r in prompts.values() if not r.dropped),
        "finished": sum(r.finished for r in results),
        "truncated_prompts": sum(r.truncated_tokens > 0 for r in prompts.values()),
        "dropped_prompts": sum(r.dropped for r in prompts.values()),
    }
