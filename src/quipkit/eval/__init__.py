"""Evaluation: perplexity protocols, zero-shot tasks, generation speed."""
