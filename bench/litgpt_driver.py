"""Runs litgpt's own `pretrain.setup` on lmalloy's packed tokens (executed by the litgpt venv).

usage: litgpt_driver.py TRAIN_BIN DTYPE OUT_DIR STEPS SEQ_LEN GLOBAL_SEQS MICRO VOCAB COMPILE
The architecture is lmalloy's `small` preset written as a litgpt Config.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

train_bin, dtype, out_dir, steps, T, gbs, mbs, vocab, compile_ = sys.argv[1:10]
steps, T, gbs, mbs, vocab = int(steps), int(T), int(gbs), int(mbs), int(vocab)
tokens = np.memmap(train_bin, dtype=dtype, mode="r")

if compile_ == "0":
    torch.compile = lambda m, *a, **k: m  # litgpt compiles unconditionally; allow eager too

import litgpt.pretrain  # noqa: E402
from litgpt import Config  # noqa: E402
from litgpt.args import EvalArgs, LogArgs, TrainArgs  # noqa: E402
from litgpt.data.base import DataModule  # noqa: E402
from litgpt.pretrain import setup  # noqa: E402

# litgpt saves its hyperparameters by re-parsing sys.argv as its own CLI; this driver has
# its own arguments, so skip that step (it does not affect training)
litgpt.pretrain.save_hyperparameters = lambda *a, **k: None


class Chunks(Dataset):
    def __len__(self):
        return (len(tokens) - 1) // T

    def __getitem__(self, i):
        return torch.from_numpy(np.asarray(tokens[i * T : i * T + T + 1], dtype=np.int64))


class PackedTokens(DataModule):
    def connect(self, tokenizer=None, batch_size=1, max_seq_length=None, **kw):
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(Chunks(), batch_size=self.batch_size, shuffle=True, num_workers=0)

    def val_dataloader(self):
        return DataLoader(Chunks(), batch_size=self.batch_size, num_workers=0)


cfg = Config(name="lmalloy-small", block_size=T, vocab_size=vocab, padded_vocab_size=vocab,
             n_layer=6, n_head=8, n_embd=320, n_query_groups=4, rotary_percentage=1.0,
             parallel_residual=False, bias=False, norm_class_name="RMSNorm", norm_eps=1e-5,
             mlp_class_name="LLaMAMLP", intermediate_size=864)
setup(model_name="lmalloy-small", model_config=cfg, out_dir=Path(out_dir), precision="32-true",
      data=PackedTokens(), devices=1,
      train=TrainArgs(save_interval=None, log_interval=1, global_batch_size=gbs,
                      micro_batch_size=mbs, max_tokens=steps * gbs * T, lr_warmup_steps=2,
                      max_norm=1.0, min_lr=4e-5, tie_embeddings=False, max_seq_length=T),
      eval=EvalArgs(interval=10**9, initial_validation=False, final_validation=False,
                    max_iters=1),
      log=LogArgs(), optimizer={"class_path": "torch.optim.AdamW", "init_args": {
          "lr": 4e-4, "weight_decay": 0.1, "betas": [0.9, 0.95]}},
      logger_name="csv", seed=0)
