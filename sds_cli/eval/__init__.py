"""Evaluation of a stage's model: perplexity windows and zero-shot tasks through lm-eval."""
