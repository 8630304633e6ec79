"""The frozen encoders (CLIP, CLAP) loaded with `from_pretrained` (frozen), and tiny checkpoints of the
same architectures for tests and the demo's media path (tiny)."""
