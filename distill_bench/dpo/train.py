"""DPO training stage: TRL ``DPOTrainer`` from a distilled-SFT checkpoint, reference = that same checkpoint.

Shares the SFT trainer's conventions and helpers (``distill_bench.train.trainer``): settings from the ``training``
section, a run fingerprint guarding ``out_dir/checkpoints``, resume from the last checkpoint with the exact token
tally stored beside it, SIGTERM/SIGUSR1 -> checkpoint, re-deliver, ``TrainingInterrupted``; the final model goes
atomically to ``out_dir/final`` and a summary to ``train_log.json``.

Token budget (declared, exact): per pair, prompt + chosen + rejected tokens (chat-templated with
``encode_prompt_response``, closing EOS included, no padding), times ``dpo.epochs``. The counting trainer adds up what
each micro-batch really carried and the run fails if that differs from the declaration. ``input_tokens`` is what
the policy forwarded (the prompt twice per pair, once with each response).

Data format: TRL's conversational format (``prompt``: the user turn, ``chosen``/``rejected``: an assistant turn), so
TRL renders the same chat template as ``encode_prompt_response``; the ids TRL produced are checked against ours
before training. Pairs longer than ``max_length`` are dropped and counted, never truncated (a truncated response
loses its EOS and changes what is preferred).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from distill_bench.dpo.config import normalize_dpo
from distill_bench.dpo.pairs import (REF_COLUMNS, REFERENCE_INFO, encode_pairs, pair_tokens, read_pairs,
                                     resolve_lengths)
from distill_bench.models.build import (check_model_tokenizer, load_model, resolve_model_ref,
                                       tokenizer_source_for_model)
from distill_bench.models.tokenizer import assert_same_tokenizer, load_tokenizer
from distill_bench.train.optim import optimizer_that_ran, trainer_optimizer
from distill_bench.train.trainer import (StepBookkeeping, TrainingJob, TrainSettings, check_even_split,
                                         checkpoints_dir, mean_loss, one_process_one_gpu, prepare_process,
                                         run_training, training_arguments, with_resolved_optim)
from distill_bench.dpo.judges import sequence_logprobs

log = logging.getLogger(__name__)

def check_reference_tokenizer(init_model: str, tokenizer_dir: str, run_tokenizer) -> str:
    """Refuse a starting checkpoint (policy and DPO reference) whose tokenizer differs from the run's."""
    src = tokenizer_source_for_model(init_model)
    if src is not None:
        assert_same_tokenizer(load_tokenizer(src), run_tokenizer, "DPO reference/policy (the starting checkpoint)",
                              names=(str(init_model), str(tokenizer_dir)))
    return check_model_tokenizer(init_model, tokenizer_dir, run_tokenizer)  # + vocabulary size vs the embeddings


def implicit_rewards(policy, reference, tokenizer, rows: Sequence[Mapping[str, Any]], beta: float,
                     batch_size: int = 16, max_length: int | None = None) -> dict[str, Any]:
    """DPO implicit rewards r = beta * (log pi(y|x) - log pi_ref(y|x)) on ``rows``; accuracy = P(r_chosen > r_rejected)
    (strict, as TRL's ``rewards/accuracies``), plus the mean margin. Used by tests and for ad-hoc evaluation."""

    enc, _ = encode_pairs(tokenizer, rows, max_length)
    seqs = []
    for e in enc:
        for key in ("chosen_ids", "rejected_ids"):
            seqs.append({"input_ids": e["prompt_ids"] + e[key],
                         "completion_mask": [0] * len(e["prompt_ids"]) + [1] * len(e[key])})
    pad = tokenizer.pad_token_id
    pol = sequence_logprobs(policy, seqs, batch_size, pad)
    ref = sequence_logprobs(reference, seqs, batch_size, pad)
    margins, wins = [], 0
    for k in range(len(enc)):
        rc = beta * (pol[2 * k][0] - ref[2 * k][0])
        rr = beta * (pol[2 * k + 1][0] - ref[2 * k + 1][0])
        margins.append(rc - rr)
        wins += rc > rr
    n = len(enc)
    return {"accuracy": wins / n if n else None, "margin_mean": sum(margins) / n if n else None, "pairs": n}


def _dpo_trainer_class():
    """DPOTrainer that counts exact tokens per micro-batch and consumes reference log-probs precomputed by the
    ``precompute_reference`` stage (TRL would otherwise recompute them in its constructor)."""
    from trl import DPOTrainer

    class CountingDPOTrainer(StepBookkeeping, DPOTrainer):
        _db_trained_tokens = 0
        _db_input_tokens = 0
        _db_pairs = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            att, comp = inputs["attention_mask"], inputs["completion_mask"]
            n = att.shape[0] // 2  # rows [chosen..., rejected...]; chosen row = prompt + chosen
            self._db_trained_tokens += int(att[:n].sum()) + int(comp[n:].sum())
            self._db_input_tokens += int(att.sum())
            self._db_pairs += n
            return super().training_step(model, inputs, num_items_in_batch)

        def create_model_card(self, *args, **kwargs):
            """No hub model cards in checkpoints (TRL 1.16's breaks when wandb is merely installed)."""
            return None

        def _precompute_ref_logps(self, dataset, name, batch_size):  # noqa: ARG002
            missing = [c for c in REF_COLUMNS if c not in dataset.column_names]
            if missing:
                raise ValueError(f"dpo.precompute_ref_logprobs is true but the {name} pairs lack {missing}: pass the "
                                 "output of the precompute_reference stage as pairs")
            return dataset

    return CountingDPOTrainer


def _dpo_config(settings, cfg: Mapping[str, Any], ckpt_dir: Path, max_steps: int, seed: int, use_cpu: bool):
    from trl import DPOConfig

    return one_process_one_gpu(DPOConfig(
        **training_arguments(settings, ckpt_dir, max_steps, seed, use_cpu),
        num_train_epochs=int(cfg["epochs"]),
        beta=float(cfg["beta"]),
        loss_type=[cfg["loss_type"]],
        max_length=None,                     # over-long pairs were dropped; never truncate here
        precompute_ref_log_probs=bool(cfg["precompute_ref_logprobs"]),
        disable_dropout=True,
    ))


def _curve(history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(int(e["step"]), float(e[key])) for e in history
            if key in e and "step" in e and math.isfinite(float(e[key]))]


DPO_REPORT_KEYS = ("final_loss", "mean_loss", "steps", "max_steps", "resumed_from_step", "trained_tokens_this_attempt",
                   "loss_curve", "reward_accuracy_final", "reward_margin_final", "reward_accuracy_curve",
                   "reward_margin_curve", "lr", "optim", "speed")


def train_dpo(*, meter, pairs: str, tokenizer: str, init_model: str, out_dir: str, dpo: Mapping[str, Any],
              training: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """DPO on the judge's pairs for ``dpo.epochs``; writes ``out_dir/final`` and ``out_dir/train_log.json``."""
    import torch
    from datasets import Dataset

    cfg = normalize_dpo(dpo)
    max_length, _ = resolve_lengths(cfg, training)
    lr = cfg["lr"] if cfg["lr"] is not None else (training or {}).get("lr")
    tok = load_tokenizer(tokenizer)
    vhash = check_reference_tokenizer(init_model, tokenizer, tok)  # before any expensive work
    ds = read_pairs(pairs)
    precompute = bool(cfg["precompute_ref_logprobs"])
    if precompute:
        ref_info_path = Path(pairs) / REFERENCE_INFO
        if not ref_info_path.is_file() or any(c not in ds.column_names for c in REF_COLUMNS):
            raise ValueError(f"dpo.precompute_ref_logprobs is true but {pairs!r} holds no precomputed reference "
                             "log-probs: pass the precompute_reference stage's output as pairs")
        ref_info = json.loads(ref_info_path.read_text())
        if resolve_model_ref(ref_info["init_model"]) != resolve_model_ref(init_model) or \
                int(ref_info["max_length"]) != max_length:
            raise ValueError(f"reference log-probs in {pairs!r} were computed for init_model "
                             f"{ref_info['init_model']!r}, max_length {ref_info['max_length']}; this run starts from "
                             f"{init_model!r} with max_length {max_length}")
    enc, dropped = encode_pairs(tok, ds, max_length)
    if not enc:
        raise ValueError(f"no DPO pair of {pairs!r} fits max_length={max_length} (dpo.max_length / training.max_length)")
    epochs = int(cfg["epochs"])
    declared = sum(pair_tokens(e) for e in enc) * epochs
    settings = TrainSettings.from_dict(training, token_budget=declared, **({"lr": lr} if lr is not None else {}),
                                       max_length=max_length)
    prepare_process(settings)
    meter.set_primary_tokens("trained_tokens")
    meter.record("pairs", len(enc))
    meter.record("epochs", epochs)
    meter.record("declared_token_budget", declared)
    meter.record("dropped_over_max_length", dropped)
    meter.record("beta", float(cfg["beta"]))
    meter.record("vocab_hash", vhash)

    rows = []
    for e in enc:
        r = ds[e["index"]]
        row = {"prompt": [{"role": "user", "content": r["prompt"]}],
               "chosen": [{"role": "assistant", "content": r["chosen"]}],
               "rejected": [{"role": "assistant", "content": r["rejected"]}]}
        if precompute:
            row.update({c: float(r[c]) for c in REF_COLUMNS})
        rows.append(row)
    stream_hash = hashlib.sha256(json.dumps([[e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]] for e in enc])
                                 .encode()).hexdigest()

    out = Path(out_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_even_split(len(enc), settings.batch_size, world)
    batches = math.ceil(len(enc) / (settings.batch_size * world))
    max_steps = epochs * max(batches // settings.grad_accum + int(batches % settings.grad_accum > 0), 1)

    model = load_model(init_model)
    settings = with_resolved_optim(settings, model, max_steps, not torch.cuda.is_available())
    args = _dpo_config(settings, cfg, checkpoints_dir(out), max_steps, seed, not torch.cuda.is_available())

    def build_trainer(callbacks: list) -> Any:
        ref_model = None if precompute else load_model(init_model)  # frozen copy of the starting checkpoint
        trainer = _dpo_trainer_class()(model=model, ref_model=ref_model, args=args,
                                       train_dataset=Dataset.from_list(rows), processing_class=tok,
                                       callbacks=callbacks)
        optimizer = trainer_optimizer(settings)
        if optimizer is not None:   # DPOTrainer takes no optimizer_cls_and_kwargs argument; the optimizer is built
            trainer.optimizer_cls_and_kwargs = optimizer   # from it in train()
        _check_trl_tokenization(trainer.train_dataset, enc)
        return trainer

    def summarize(trainer, history: list) -> dict[str, Any]:
        loss = _curve(history, "loss")
        acc = _curve(history, "rewards/accuracies")
        margins = _curve(history, "rewards/margins")
        return {
            "declared_token_budget": declared, "pairs": len(enc), "epochs": epochs, "dropped_over_max_length": dropped,
            "loss_curve": loss, "final_loss": loss[-1][1] if loss else None, "mean_loss": mean_loss(loss),
            "reward_accuracy_curve": acc, "reward_margin_curve": margins,
            "reward_accuracy_final": acc[-1][1] if acc else None,
            "reward_margin_final": margins[-1][1] if margins else None,
            "lr": float(settings.lr), "optim": optimizer_that_ran(settings, trainer), "dpo": dict(cfg),
            "init_model": str(init_model), "pairs_dir": str(pairs),
        }

    extra = {"pipeline": "dpo", "beta": cfg["beta"], "loss_type": cfg["loss_type"], "epochs": epochs,
             "precompute": precompute, "init_model": str(init_model)}
    return run_training(TrainingJob(
        settings=settings, seed=seed, out=out, tokenizer=tok, model_config=model.config.to_dict(),
        stream_hash=stream_hash, trainer_name="DPOTrainer", fingerprint_extra=extra, max_steps=max_steps,
        expected_tokens=declared, expected_what=f"declared ({len(enc)} pairs x {epochs} epochs)",
        build_trainer=build_trainer, summarize=summarize, report_keys=DPO_REPORT_KEYS, meter=meter, what="DPO "))


def _check_trl_tokenization(prepared, enc: Sequence[Mapping[str, Any]]) -> None:
    """TRL's ids must be ours (same template, same prompt/completion split), or the budget would be fiction."""
    cols = ("prompt_ids", "chosen_ids", "rejected_ids")
    got = prepared.select_columns(list(cols)).to_list()
    if len(got) != len(enc):
        raise RuntimeError(f"TRL kept {len(got)} of {len(enc)} pairs while preparing the dataset")
    for g, e in zip(got, enc):
        for c in cols:
            if list(g[c]) != list(e[c]):
                raise RuntimeError(f"TRL tokenised pair {e['index']} ({c}) differently from encode_prompt_response; "
                                   "the chat template renders a prompt differently alone and with a response")
