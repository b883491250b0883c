"""Scoring backends and task data: lm-eval (HF or vLLM) and the quick local evaluator."""
