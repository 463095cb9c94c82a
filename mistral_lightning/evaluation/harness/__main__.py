"""`python -m mistral_lightning.evaluation.harness --model mistral-lightning --model_args checkpoint=DIR ...`:
lm-eval's own command line (`lm_eval`), with this package's model registered first. lm-eval 0.4 finds
only the models it imports itself, so plain `lm_eval --model mistral-lightning` cannot know ours."""

import sys

from lm_eval.__main__ import cli_evaluate

from mistral_lightning.errors import UserError
from mistral_lightning.evaluation.harness import MODEL_NAME


def main() -> int:
    try:
        cli_evaluate()
    except UserError as error:  # a bad model_args value or checkpoint: one line, as our own commands print it
        print(f"{MODEL_NAME}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
