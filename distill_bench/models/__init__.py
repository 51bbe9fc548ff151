"""Tokenizer, model construction/loading and vocabulary checks (no torch at import)."""
from distill_bench.models.build import (count_parameters, init_model_from_arch, load_model, resolve_model_ref,
                                        save_model_dir, tokenizer_source_for_model, write_model_ref)
from distill_bench.models.tokenizer import (TokenizerMismatchError, assert_same_tokenizer, encode_prompt,
                                            encode_prompt_response, load_tokenizer, save_tokenizer,
                                            train_tokenizer, vocab_hash)

__all__ = ["count_parameters", "init_model_from_arch", "load_model", "resolve_model_ref", "save_model_dir",
           "tokenizer_source_for_model", "write_model_ref", "TokenizerMismatchError", "assert_same_tokenizer",
           "encode_prompt", "encode_prompt_response", "load_tokenizer", "save_tokenizer", "train_tokenizer",
           "vocab_hash"]
