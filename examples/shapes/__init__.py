"""The shapes world: dataset, tokenizer, autoencoder and evaluator behind the bundled model (issue 5)."""
