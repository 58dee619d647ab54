"""Evaluation: benchmarks and the answer-score loop (`loop`), scorers behind one registry (`scorers`), and
generation with a KV cache and a cached chat prefix (`generate`)."""

from vlm_jax.evaluation import generate, scorers
from vlm_jax.evaluation.loop import (Answerer, Benchmark, EvalItem, answer_baselines, chat_prefix_tokens, evaluate,
                                     llava_benchmark, read_records, score_benchmark, summarize, synthetic_benchmarks,
                                     write_predictions)

__all__ = ["Answerer", "Benchmark", "EvalItem", "answer_baselines", "chat_prefix_tokens", "evaluate", "generate",
           "llava_benchmark", "read_records", "score_benchmark", "scorers", "summarize", "synthetic_benchmarks",
           "write_predictions"]
