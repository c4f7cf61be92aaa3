"""LLaVA-format data: synthetic task, shards, chat templates, tokenizers, Lightning data module."""
