"""The resumable, metered generation loop shared by synthetic data (teacher responses) and DPO sampling (candidates).

Prompts are cut into chunks of a few batches; each finished chunk is checkpointed (``ChunkCheckpoint``), so a
preempted stage regenerates only the chunks it had not finished, with the same per-chunk seed. Generated tokens
reach the meter batch by batch as the backend reports them (the meter's steady-state window sees only its own
tokens; the first batch carries warm-up and marks the steady state), and each chunk's exact totals are settled
against what the results hold; prompt tokens are charged per chunk.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

from distill_bench.artifacts import ChunkCheckpoint
from distill_bench.generation import generate
from distill_bench.generation.settings import GenerationResult, GenerationSettings

# prompts per chunk = CHUNK_BATCHES batches' worth of prompts (samples_per_prompt rows each)
CHUNK_BATCHES = 4


def chunk_bounds(n_prompts: int, settings: GenerationSettings) -> list[tuple[int, int]]:
    """[lo, hi) prompt ranges of the chunks: ``CHUNK_BATCHES`` batches of ``batch_size // num_samples`` prompts."""
    per_chunk = chunk_prompts(settings)
    return [(s, min(s + per_chunk, n_prompts)) for s in range(0, n_prompts, per_chunk)]


def chunk_prompts(settings: GenerationSettings) -> int:
    return max(1, settings.batch_size // settings.num_samples) * CHUNK_BATCHES


class MeteredTokens:
    """``on_batch`` callback: charges each batch's generated tokens to the meter as they come, marks the steady
    state after the first batch (which carries warm-up: allocator, kernels, caches), and measures decode tokens/s
    over the later batches. ``settle`` charges the rest of the exact total (a backend that does not report batches)
    and refuses a backend that reported more than its results hold."""

    def __init__(self, meter: Any) -> None:
        self.meter, self.batches, self.charged, self.tokens, self.seconds = meter, 0, 0, 0, 0.0

    def __call__(self, n_tokens: int, elapsed_s: float) -> None:
        self.batches += 1
        self.meter.add_tokens("generated_tokens", int(n_tokens))
        self.charged += int(n_tokens)
        if self.batches == 1:
            self.meter.mark_steady_state()
            return
        self.tokens += int(n_tokens)
        self.seconds += float(elapsed_s)

    def settle(self, generated: int) -> None:
        if generated < self.charged:
            raise RuntimeError(f"generation backend reported {self.charged} generated tokens per batch but its "
                               f"results hold {generated}")
        self.meter.add_tokens("generated_tokens", generated - self.charged)
        self.charged = generated

    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None


@dataclasses.dataclass
class ChunkedRun:
    """What one attempt generated (resumed chunks excluded): exact token totals and the time spent generating."""

    generated_tokens: int = 0
    input_tokens: int = 0
    generate_s: float = 0.0


def generate_chunks(model, tokenizer, prompts: Sequence[str], *, chunks: Sequence[tuple[int, int]],
                    todo: Sequence[int], settings: GenerationSettings, seed_of: Callable[[int], int],
                    row_of: Callable[[int, GenerationResult], dict], checkpoint: ChunkCheckpoint, meter: Any,
                    tokens: MeteredTokens, run: ChunkedRun | None = None, one_call: bool = False,
                    prompt_offset: int = 0) -> ChunkedRun:
    """Generate the chunks ``todo`` (indices into ``chunks``, prompt ranges offset by ``prompt_offset``) and save
    each into ``checkpoint`` as rows ``row_of(prompt_index, result)`` in (prompt, sample) order.

    ``seed_of(chunk)`` seeds a chunk (so a rerun regenerates it identically); ``one_call`` hands every chunk to the
    backend in one call (vLLM schedules its own continuous batches; the seed is the first chunk's). Dropped prompts
    (too long) are kept as rows but carry no tokens. ``run`` accumulates over several calls (one per model)."""
    run = run if run is not None else ChunkedRun()
    charged_in = 0
    fresh_in = 0
    groups = [list(todo)] if one_call and todo else [[c] for c in todo]
    for group in groups:
        lo, hi = chunks[group[0]][0] - prompt_offset, chunks[group[-1]][1] - prompt_offset
        t0 = time.perf_counter()
        results = generate(model, tokenizer, list(prompts[lo:hi]), dataclasses.replace(settings, seed=seed_of(group[0])),
                           on_batch=tokens)
        run.generate_s += time.perf_counter() - t0
        by_chunk: dict[int, list[dict]] = {c: [] for c in group}
        for r in sorted(results, key=lambda r: (r.prompt_index, r.sample_index)):
            i = lo + r.prompt_index
            if not r.dropped:
                run.generated_tokens += int(r.generated_tokens)
                fresh_in += int(r.prompt_tokens)
            chunk = next(c for c in group if chunks[c][0] <= prompt_offset + i < chunks[c][1])
            by_chunk[chunk].append(row_of(i, r))
        tokens.settle(run.generated_tokens)
        meter.add_tokens("input_tokens", fresh_in - charged_in)
        charged_in = fresh_in
        for c, rows in by_chunk.items():
            checkpoint.save(c, rows)
    run.input_tokens += fresh_in
    return run
