"""Integrations with model libraries. ``hf``: Hugging Face transformers + PEFT prefix tuning."""
