"""cnclip: adapt Chinese CLIP models to a domain (clean pairs, LoRA fine-tuning, evaluation, publishing)."""

__version__ = "0.1.0"
