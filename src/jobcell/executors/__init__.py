"""Where artifact steps run. Each backend builds commands with pure functions."""
