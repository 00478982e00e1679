"""Checkpoints on disk: fixture models in the exact Qwen v1 layout, the
auto-gptq packer, and conversion to Qwen2."""
