"""Plain nn.Modules whose state-dict names are the published checkpoints' names. No file I/O here."""
