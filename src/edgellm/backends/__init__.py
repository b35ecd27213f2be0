"""Model backends. Each implements the engine's `Runner` and `Tokenizer` protocols."""
