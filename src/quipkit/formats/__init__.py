"""Checkpoint format: safetensors + config.json with quantization_config."""
