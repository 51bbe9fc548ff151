"""Vocabulary identity: a hash of the token -> id map, computable from a loaded tokenizer or from its files.

Logit KD compares the teacher's and the student's distributions id by id, so it needs the same token behind every
id; a matching vocabulary *size* proves nothing (two BPEs of one size map ids to different strings). The hash covers
every entry of the map, the added and special tokens (``<|im_end|>``, ``<|eot_id|>`` ...) included, and nothing else:
role assignments (which token is eos or pad) and chat templates may differ between an instruct teacher and a base
student of one family without changing what an id means.

Pure Python (json, hashlib, pathlib): the planner imports this module to refuse a KD pair before any job runs,
reading ``tokenizer.json`` from a local directory or from the Hugging Face cache without network access.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

TOKENIZER_FILE = "tokenizer.json"
MODEL_REF = "model_ref.json"


def vocabulary_hash_of_map(token_to_id: Mapping[str, int]) -> str:
    """sha256 over the sorted (token, id) pairs."""
    pairs = sorted((str(tok), int(i)) for tok, i in token_to_id.items())
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8")).hexdigest()


def vocabulary_hash(tokenizer: Any) -> str:
    """The hash of a loaded HF tokenizer's ``get_vocab()`` (base vocabulary plus added tokens)."""
    return vocabulary_hash_of_map(tokenizer.get_vocab())


def token_map_from_tokenizer_json(path: str | os.PathLike) -> dict[str, int]:
    """token -> id of a ``tokenizer.json`` (BPE/WordPiece/WordLevel dict or Unigram list) plus its added tokens."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    model = data.get("model") or {}
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        out = {str(k): int(v) for k, v in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the position
        out = {str(entry[0]): i for i, entry in enumerate(vocab)}
    else:
        raise ValueError(f"{path}: no model.vocab in tokenizer.json (model type {model.get('type')!r})")
    for added in data.get("added_tokens") or []:
        out[str(added["content"])] = int(added["id"])
    return out


def hf_cache_snapshot(repo_id: str) -> Path | None:
    """The locally cached snapshot directory of hub model ``repo_id`` (refs/main), or None; never touches the net."""
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        return None
    if os.environ.get("HF_HUB_CACHE"):
        roots = [Path(os.environ["HF_HUB_CACHE"])]
    elif os.environ.get("HF_HOME"):
        roots = [Path(os.environ["HF_HOME"]) / "hub"]
    else:
        roots = [Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface" / "hub"]
    for root in roots:
        repo = root / ("models--" + repo_id.replace("/", "--"))
        ref = repo / "refs" / "main"
        if ref.is_file():
            snap = repo / "snapshots" / ref.read_text().strip()
            if snap.is_dir():
                return snap
    return None


def local_tokenizer_dir(ref: str | None) -> Path | None:
    """Where ``ref``'s tokenizer.json can be read without network: a local dir (following a model_ref.json
    pointer's ``tokenizer`` or ``name_or_path``), or the HF cache snapshot of a hub id. None when unknown locally."""
    if not ref:
        return None
    path = Path(ref).expanduser()
    for _ in range(4):  # a pointer may point at a pointer; never loop forever
        if not path.is_dir():
            break
        pointer = path / MODEL_REF
        if (path / TOKENIZER_FILE).is_file():
            return path
        if not pointer.is_file():
            return None
        try:
            payload = json.loads(pointer.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        ref = payload.get("tokenizer") or payload.get("name_or_path")
        if not ref:
            return None
        path = Path(ref).expanduser()
    if path.is_dir():
        return path if (path / TOKENIZER_FILE).is_file() else None
    return hf_cache_snapshot(str(ref))


def vocabulary_hash_from_files(ref: str | None) -> str | None:
    """The vocabulary hash of ``ref`` read from its tokenizer.json when it is available locally, else None."""
    where = local_tokenizer_dir(ref)
    if where is None or not (where / TOKENIZER_FILE).is_file():
        return None
    return vocabulary_hash_of_map(token_map_from_tokenizer_json(where / TOKENIZER_FILE))
