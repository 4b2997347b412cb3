"""Checkpoint IO: the one name-mapping table, safetensors reading, HF folders."""
