"""lmalloy: make small language models better without making them bigger.

Pretrain (TinyLlama recipe), average checkpoints (EMA/SWA/LaWA), merge fine-tunes,
build Mixtral-style MoEs, proxy-tune at decode time. Hugging Face folders in and out.
This package's __init__ imports nothing heavy: `lmalloy --help` stays fast.
"""

__version__ = "0.1.0"
