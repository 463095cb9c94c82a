"""The fit configs, installed as the package data of `mistral_lightning.configs` (see cli/configs.py)."""
