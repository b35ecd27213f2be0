"""Evaluation: perplexity as llama.cpp measures it, divergence from a reference model on the
same tokens, and gates that turn those figures into a deploy / do-not-deploy verdict."""
