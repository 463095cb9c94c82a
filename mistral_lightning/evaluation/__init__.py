"""Evaluation: MMLU accuracy (k-shot, letter-logit or 1-token generation scoring).

`mmlu_data` (CSV reading, prompts) is torch-free; `mmlu` (scoring) and `cli` load the model stack.
"""
