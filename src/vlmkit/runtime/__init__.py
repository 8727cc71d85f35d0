"""Run models: conversation templates, tokenisation, image preprocessing, generation."""
