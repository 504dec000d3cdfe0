"""The target writing data: regeneration, self-synthesis, the builtin sets, the resumable JSONL writer."""
