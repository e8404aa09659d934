"""Hugging Face transformers / PEFT integration: patching, prefix cache, mask handling."""
