"""`python -m mistral_lightning.evaluation.harness --model mistral-lightning --model_args checkpoint=DIR ...`:
lm-eval's own command line (`lm_eval`), with this package's model registered first. lm-eval 0.4 finds
only the models it imports itself, so plain `lm_eval --model mistral-lightning` cannot know ours."""

from lm_eval.__main__ import cli_evaluate

import mistral_lightning.evaluation.harness  # noqa: F401  (registers "mistral-lightning")

if __name__ == "__main__":
    cli_evaluate()
