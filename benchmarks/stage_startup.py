"""What a GPU stage spends inside its meter before its first GPU work: a fresh interpreter per repeat, timing each
step a generating or training stage takes before it computes anything -- the heavy imports, CUDA's initialisation,
loading a model directory onto the device, loading its tokenizer, and the CodeCarbon tracker's start (which the
meter pays just before its window opens). The stage JSONs show the sum of these as seconds at idle power at the start
of every GPU stage; this splits it.

    python benchmarks/stage_startup.py --model DIR [--tokenizer DIR] [--repeats 3] [--out DIR]
    python benchmarks/stage_startup.py --quick --out DIR     # CPU: a tiny model it builds itself, one repeat

Prints a table (median and range over the repeats, seconds) and writes stage_startup.json under --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# one fresh process: each step timed in the order a stage meets it
PROBE = r"""
import json, sys, time
steps = []
def step(name, fn):
    t = time.perf_counter()
    out = fn()
    steps.append((name, time.perf_counter() - t))
    return out
step("import distill_bench.energy", lambda: __import__("distill_bench.energy"))
torch = step("import torch", lambda: __import__("torch"))
step("import transformers", lambda: __import__("transformers"))
step("import datasets", lambda: __import__("datasets"))
def cuda_init():
    if torch.cuda.is_available():
        torch.cuda.init()
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
step("CUDA initialisation", cuda_init)
def codecarbon():
    if not CODECARBON:
        return
    from distill_bench.energy.codecarbon_adapter import CodeCarbonAdapter
    import tempfile
    from pathlib import Path
    adapter = CodeCarbonAdapter(output_dir=Path(tempfile.mkdtemp()), country_iso_code="USA", project_name="startup")
    adapter.start()
    return adapter
adapter = step("CodeCarbon start", codecarbon)
def model():
    from distill_bench.generation.hf_backend import load_model
    m = load_model(MODEL)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return m
step("load model onto the device", model)
def tokenizer():
    from distill_bench.generation.prompts import load_tokenizer
    return load_tokenizer(TOKENIZER)
step("load tokenizer", tokenizer)
if adapter is not None:
    adapter.stop()
print("STEPS " + json.dumps(steps))
"""


def probe(model: str, tokenizer: str, codecarbon: bool) -> list[tuple[str, float]]:
    code = f"MODEL = {model!r}\nTOKENIZER = {tokenizer!r}\nCODECARBON = {codecarbon!r}\n" + PROBE
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("STEPS ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"stage_startup probe failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return [tuple(s) for s in json.loads(line[len("STEPS "):])]


def tiny_model(out: Path) -> Path:
    """A 2-layer model with the embedded task's tokenizer, saved like a workflow's model directory."""
    sys.path.insert(0, str(ROOT))
    from distill_bench.models.build import init_model_from_arch, save_model_dir
    from distill_bench.models.tokenizer import train_tokenizer

    tok = train_tokenizer(["12 + 7 = 19", "3 * 4 = 12", "what is 5 - 2?"] * 20, vocab_size=64)
    model = init_model_from_arch({"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
                                 tok, seed=0)
    return save_model_dir(model, out / "tiny_model", tokenizer=tok)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a model directory of a finished run (a teacher or student)")
    ap.add_argument("--tokenizer", default=None, help="its tokenizer directory (default: the model directory)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-codecarbon", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a tiny model built here, one repeat, no CodeCarbon")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        if not args.out:
            ap.error("--quick needs --out (the tiny model is written there)")
        args.model, args.repeats, args.no_codecarbon = str(tiny_model(Path(args.out))), 1, True
    if not args.model:
        ap.error("--model is required (or --quick)")
    runs = [probe(args.model, args.tokenizer or args.model, not args.no_codecarbon) for _ in range(args.repeats)]
    names = [name for name, _ in runs[0]]
    rows = []
    for i, name in enumerate(names):
        values = [run[i][1] for run in runs]
        rows.append({"step": name, "median_s": statistics.median(values), "min_s": min(values),
                     "max_s": max(values)})
    total = [sum(s for _, s in run) for run in runs]
    rows.append({"step": "total", "median_s": statistics.median(total), "min_s": min(total), "max_s": max(total)})
    print(f"{'step':<30} {'median s':>9} {'min':>7} {'max':>7}   ({args.repeats} fresh processes)")
    for row in rows:
        print(f"{row['step']:<30} {row['median_s']:>9.2f} {row['min_s']:>7.2f} {row['max_s']:>7.2f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "stage_startup.json").write_text(json.dumps({"model": args.model, "repeats": args.repeats,
                                                            "rows": rows, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
