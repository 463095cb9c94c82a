"""Adapters applied to the plain `Mistral` module from outside it: LoRA (and QLoRA's 4-bit base)."""
