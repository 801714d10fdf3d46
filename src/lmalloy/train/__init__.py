"""Training: the TinyLlama-style trainer used by pretrain and finetune."""
