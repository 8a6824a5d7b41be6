"""Offline build: turn a BERT-family checkpoint into servable, measured variants in the model store."""
