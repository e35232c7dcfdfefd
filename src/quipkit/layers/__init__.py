"""The quantized layer and its bit packing."""
