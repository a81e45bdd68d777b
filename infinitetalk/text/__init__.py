"""umT5 tokenizer (sentencepiece) and prompt defaults."""
