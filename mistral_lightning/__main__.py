import sys

from mistral_lightning.cli import main

sys.exit(main())
