"""Base model + your data -> QLoRA adapter -> merged 16-bit checkpoint -> GPTQ checkpoint."""
__version__ = "0.2.0"
