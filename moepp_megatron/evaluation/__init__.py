"""Evaluation of converted Hugging Face models with lm-evaluation-harness (``moepp-eval``)."""
