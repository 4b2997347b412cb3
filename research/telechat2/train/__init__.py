"""Training: the run config (MindFormers YAML layout), the loop, optimizer, checkpoints and reports."""
