"""vlmkit: convert, verify, run, serve and fine-tune vision-language models."""

__version__ = "0.1.0"
