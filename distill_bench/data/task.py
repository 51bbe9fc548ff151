"""Embedded task: seeded multi-step arithmetic word problems with a checkable worked solution.

Why this shape: the embedded default trains tiny models (vocab ~300, <=160 tokens) on a 2-core CPU, so the task must
be short, use a small closed vocabulary, and be verifiable by exact match on the final ``#### <answer>`` line. Each
step's arithmetic is written out ("17 + 8 = 25") so students learn a procedure rather than memorise answers, and the
difficulty is tuned through the number of steps, the operand range and the allowed operations.

Example (2 steps)::

    prompt:   Mia has 17 marbles. She finds 8 more, then gives 5 to Leo. How many marbles does Mia have now?
    response: 17 + 8 = 25
              25 - 5 = 20
              #### 20
"""
from __future__ import annotations

import random
import re
from typing import Iterable, Sequence

import datasets

# A deliberately small vocabulary: the tokenizer is trained on this text and has only ~300 entries.
NAMES: tuple[tuple[str, str], ...] = (
    ("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Sam", "He"),
    ("Zoe", "She"), ("Max", "He"), ("Ivy", "She"), ("Tom", "He"),
)
OBJECTS: tuple[str, ...] = ("marbles", "apples", "stickers", "coins", "books", "cards", "pens", "shells")
ADD_PHRASES: tuple[str, ...] = ("finds {n} more", "buys {n} more", "gets {n} more", "wins {n} more")
SUB_PHRASES: tuple[str, ...] = ("gives {n} to {other}", "loses {n}", "sells {n}", "gives away {n}")
MUL_PHRASES: dict[int, str] = {2: "doubles them", 3: "triples them"}

_MAX_MISSES = 5000  # consecutive repeats before declaring the task space exhausted
MAX_RESULT = 999  # every intermediate and final value stays in [0, MAX_RESULT]
_OP_ALIASES = {"+": "+", "-": "-", "*": "*", "x": "*", "×": "*"}
RECORD_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "prompt": datasets.Value("string"),
    "response": datasets.Value("string"),
    "answer": datasets.Value("string"),
    "source": datasets.Value("string"),
})


def normalize_prompt(text: str) -> str:
    """Key used for dedup and train/eval disjointness: case- and whitespace-insensitive."""
    return re.sub(r"\s+", " ", text.strip().lower())


def _check_args(n_train: int, n_eval: int, min_steps: int, max_steps: int, max_operand: int,
                ops: Sequence[str]) -> tuple[str, ...]:
    key = "datasets.<name>.task"
    for name, value, low in (("n_train", n_train, 0), ("n_eval", n_eval, 0), ("min_steps", min_steps, 1),
                             ("max_operand", max_operand, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            where = f"datasets.<name>.{name}" if name.startswith("n_") else f"{key}.{name}"
            raise ValueError(f"{where} must be an integer >= {low}, got {value!r}")
    if not isinstance(max_steps, int) or max_steps < min_steps:
        raise ValueError(f"{key}.max_steps must be an integer >= min_steps ({min_steps}), got {max_steps!r}")
    if max_operand > MAX_RESULT:
        raise ValueError(f"{key}.max_operand must be <= {MAX_RESULT}, got {max_operand}")
    if isinstance(ops, str) or not ops:
        raise ValueError(f"{key}.ops must be a non-empty list of operations from {sorted(_OP_ALIASES)}, got {ops!r}")
    canon = []
    for op in ops:
        if op not in _OP_ALIASES:
            raise ValueError(f"{key}.ops: unknown operation {op!r}; allowed: {sorted(_OP_ALIASES)}")
        if _OP_ALIASES[op] not in canon:
            canon.append(_OP_ALIASES[op])
    if not {"+", "-"} & set(canon):
        raise ValueError(f"{key}.ops must contain '+' or '-' (products alone leave the range quickly), got {ops!r}")
    return tuple(canon)


def _make_problem(rng: random.Random, *, min_steps: int, max_steps: int, max_operand: int,
                  ops: tuple[str, ...]) -> tuple[str, str, int] | None:
    """One problem: (prompt, response, answer), or None when no operation keeps the value in [0, MAX_RESULT]."""
    (name, pronoun) = rng.choice(NAMES)
    other = rng.choice([n for n, _ in NAMES if n != name])
    obj = rng.choice(OBJECTS)
    steps = rng.randint(min_steps, max_steps)
    value = rng.randint(1, max_operand)
    start = value
    clauses: list[str] = []
    lines: list[str] = []
    for _ in range(steps):
        allowed = [op for op in ops
                   if (op == "+" and value + 1 <= MAX_RESULT)
                   or (op == "-" and value >= 1)
                   or (op == "*" and value >= 1 and value * 2 <= MAX_RESULT)]
        if not allowed:
            return None
        op = rng.choice(allowed)
        if op == "+":
            n = rng.randint(1, min(max_operand, MAX_RESULT - value))
            clauses.append(rng.choice(ADD_PHRASES).format(n=n))
            new = value + n
        elif op == "-":
            n = rng.randint(1, min(max_operand, value))
            clauses.append(rng.choice(SUB_PHRASES).format(n=n, other=other))
            new = value - n
        else:
            n = rng.choice([f for f in MUL_PHRASES if value * f <= MAX_RESULT])
            clauses.append(MUL_PHRASES[n])
            new = value * n
        lines.append(f"{value} {op} {n} = {new}")
        value = new
    body = ", then ".join(clauses)
    prompt = (f"{name} has {start} {obj}. {pronoun} {body}. "
              f"How many {obj} does {name} have now?")
    response = "\n".join(lines + [f"#### {value}"])
    return prompt, response, value


def _draw(rng: random.Random, count: int, exclude: set[str], params: dict) -> Iterable[tuple[str, str, int]]:
    """Yield ``count`` problems whose normalised prompts are new (not in ``exclude``, which is updated)."""
    made, misses = 0, 0
    while made < count:
        if misses >= _MAX_MISSES:
            raise ValueError(
                f"could not generate {count} distinct problems (got {made}; {misses} draws in a row were repeats): "
                f"the task space is too small for the requested sizes; raise datasets.<name>.task.max_operand or "
                f"max_steps, or lower n_train/n_eval (params {params})")
        misses += 1
        problem = _make_problem(rng, **params)
        if problem is None:
            continue
        prompt, response, answer = problem
        key = normalize_prompt(prompt)
        if key in exclude:
            continue
        exclude.add(key)
        made += 1
        misses = 0
        yield prompt, response, answer


def generate_task(*, seed: int, n_train: int, n_eval: int, min_steps: int = 2, max_steps: int = 3,
                  max_operand: int = 30, ops: Sequence[str] = ("+", "-"), name: str = "arith") -> datasets.DatasetDict:
    """Build the embedded task as a DatasetDict (train, eval) in the common record schema.

    Eval is drawn first from its own seeded stream, so it depends only on (seed, n_eval, task params) and stays fixed
    when n_train changes; train then skips every prompt already used (dedup + disjointness by normalised prompt).
    """
    canon_ops = _check_args(n_train, n_eval, min_steps, max_steps, max_operand, ops)
    params = dict(min_steps=min_steps, max_steps=max_steps, max_operand=max_operand, ops=canon_ops)
    seen: set[str] = set()
    splits = {}
    for split, count in (("eval", n_eval), ("train", n_train)):
        rng = random.Random(f"distill-bench/{name}/{seed}/{split}")
        rows = {k: [] for k in RECORD_FEATURES}
        for i, (prompt, response, answer) in enumerate(_draw(rng, count, seen, params)):
            rows["id"].append(f"{name}-{split}-{i}")
            rows["prompt"].append(prompt)
            rows["response"].append(response)
            rows["answer"].append(str(answer))
            rows["source"].append("embedded")
        splits[split] = datasets.Dataset.from_dict(rows, features=RECORD_FEATURES)
    return datasets.DatasetDict({"train": splits["train"], "eval": splits["eval"]})
