"""lm-evaluation-harness on our model: importing this package registers it with lm-eval as "mistral-lightning".

`model` holds the lm-eval `LM`; `run` is `mistral-lightning evaluate --harness`; `python -m
mistral_lightning.evaluation.harness` is lm-eval's own command line with the model registered.
"""

from mistral_lightning.evaluation.harness.model import MODEL_NAME, MistralLightningLM

__all__ = ["MODEL_NAME", "MistralLightningLM"]
