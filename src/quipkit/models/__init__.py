"""Model loading and architecture-independent discovery of blocks and linear layers."""
