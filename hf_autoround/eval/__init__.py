"""Evaluation: perplexity on text (here) and lm-eval tasks on local data (``lm_eval_tasks``)."""
