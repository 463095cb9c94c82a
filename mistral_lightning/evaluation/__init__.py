"""Evaluation: MMLU accuracy (k-shot, letter-logit or 1-token generation scoring) and lm-evaluation-harness tasks.

`mmlu_data` (CSV reading, prompts) is torch-free; `mmlu` (scoring) and `cli` load the model stack; `harness`
(lm-eval's `LM` over our model) is imported only by `evaluate --harness`, since lm-eval is an optional extra.
"""
