"""`lmalloy reward train`: M pairwise reward models from one initialisation (WARM's recipe).

WARM (arXiv 2401.12187, section 3) fine-tunes M reward models from a *shared*
initialisation with diverse hyperparameters, so their weights stay linearly connected
and can be averaged. Here every model starts from the same causal LM with the same
score head (drawn from `--seed`), and model i draws its own seed (data order, dropout
noise), peak learning rate (log-uniform in `--lr LOW,HIGH`) and attention dropout
(uniform in `--dropout LOW,HIGH`). Baklava (WARM, section 3.3): give `--base-model` one
folder per model, e.g. checkpoints of one fine-tuning run, instead of one shared body.

The optimisation is the trainer's: AdamW, weight decay on matrices only, gradient
clipping, linear warmup then cosine decay (lmalloy.train.trainer's `param_groups` and
`lr_lambda`), with the Bradley–Terry loss on batches of pairs. Each model is written as
an HF folder `rm-NN/` (atomically) with `reward.json` (its hyperparameters and the id of
its initialisation, which `reward warm` checks) beside the weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from lmalloy.errors import UserError

META_FILE = "reward.json"


def draw_hparams(cfg, i: int) -> dict:
    """Model i's seed, learning rate (log-uniform) and dropout (uniform) from cfg's ranges."""
    seed = cfg.seed + 1 + i
    rng = random.Random(seed)
    lo, hi = cfg.lr[0], cfg.lr[-1]
    lr = math.exp(rng.uniform(math.log(lo), math.log(hi))) if hi > lo else lo
    dlo, dhi = cfg.dropout[0], cfg.dropout[-1]
    dropout = rng.uniform(dlo, dhi) if dhi > dlo else dlo
    return {"seed": seed, "lr": lr, "dropout": dropout}


def data_order(n: int, steps: int, batch: int, seed: int) -> list[list[int]]:
    """Pair indices of each step: fresh permutations of the pairs, epoch after epoch."""
    g = torch.Generator().manual_seed(seed)
    flat: list[int] = []
    while len(flat) < steps * batch:
        flat += torch.randperm(n, generator=g).tolist()
    return [flat[s * batch : (s + 1) * batch] for s in range(steps)]


def set_dropout(model, p: float) -> None:
    """Attention dropout of every attention module (and the config) to p."""
    model.config.attention_dropout = p
    for mod in model.modules():
        if hasattr(mod, "attention_dropout"):
            mod.attention_dropout = p


def init_group(model) -> str:
    """Id of a shared initialisation: hash of the head's initial weights and the body's config."""
    h = hashlib.sha256(model.score.weight.detach().float().cpu().numpy().tobytes())
    cfg = {k: v for k, v in model.config.to_dict().items()
           if k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    return h.hexdigest()[:16]


def train_one(model, pairs_ids: list[tuple[list[int], list[int]]], hp: dict, cfg, pad_id: int,
              device: torch.device, log, label: str = "rm") -> dict:
    """Fit one reward model in place; returns its summary (loss, accuracy, throughput)."""
    from lmalloy.reward.model import bt_loss, forward_scores
    from lmalloy.train.trainer import adamw, lr_lambda

    n = len(pairs_ids)
    B = min(cfg.batch_size, n)
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * n / B))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(0.05 * steps)
    torch.manual_seed(hp["seed"])
    set_dropout(model, hp["dropout"])
    model.to(device).train()
    opt = adamw(model, cfg.weight_decay, hp["lr"], (0.9, 0.95), torch.device(device))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, steps, cfg.min_lr_ratio))
    order = data_order(n, steps, B, hp["seed"])
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=label, unit="step", file=sys.stderr, dynamic_ncols=True,
                   disable=None,
                   mininterval=1.0)
    t0 = time.perf_counter()
    tokens = 0
    losses, accs = [], []
    for step in range(steps):
        idx = order[step]
        seqs = [pairs_ids[i][0] for i in idx] + [pairs_ids[i][1] for i in idx]
        tokens += sum(len(s) for s in seqs)
        r = forward_scores(model, seqs, pad_id)  # (2B,)
        r_c, r_r = r[: len(idx)], r[len(idx) :]
        loss = bt_loss(r_c, r_r)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        accs.append(float((r_c > r_r).float().mean()))
        if (step + 1) % 10 == 0 or step + 1 == steps:
            dt = time.perf_counter() - t0
            log({"model": label, "step": step + 1, "loss": sum(losses[-10:]) / len(losses[-10:]),
                 "acc": sum(accs[-10:]) / len(accs[-10:]), "lr": sched.get_last_lr()[0],
                 "pairs_per_s": (step + 1) * B / dt, "tokens_per_s": tokens / dt})
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    dt = time.perf_counter() - t0
    model.eval()
    k = max(1, steps // 10)
    return {"steps": steps, "final_loss": sum(losses[-k:]) / k, "final_train_acc":
            sum(accs[-k:]) / k, "seconds": dt, "pairs_per_s": steps * B / dt,
            "tokens_per_s": tokens / dt}


def save_reward_model(model, folder: Path, aux_from: Path, meta: dict) -> None:
    """An HF folder: config.json, safetensors weights, tokenizer files, reward.json."""
    from lmalloy.io.writer import copy_aux_files, write_state_dict

    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_state_dict(folder, state)
    copy_aux_files(aux_from, folder)
    (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def _check_inits(paths: list[str], seq_len: int) -> None:
    from lmalloy.io.folder import check_same_architecture, compare_tensors, open_model
    from lmalloy.io.tokenizer_files import check_same_tokenizer

    folders = [open_model(p) for p in paths]
    for f in folders:
        f.check_seq_len(seq_len)
    check_same_architecture(folders)
    compare_tensors(folders[0], folders)
    for p in paths:
        if not (Path(p) / "tokenizer.json").is_file():
            raise UserError(f"--base-model: {p} has no tokenizer.json")
    check_same_tokenizer(folders)


def main(cfg) -> int:
    from lmalloy.io.writer import atomic_output, check_output
    from lmalloy.reward.data import read_pairs
    from lmalloy.reward.model import Encoder, reward_from_causal_lm
    from lmalloy.train.trainer import Dist

    pairs = [p for f in cfg.pairs for p in read_pairs(f)]
    _check_inits(cfg.base_model, cfg.seq_len)
    out = check_output(cfg.out, cfg.overwrite, inputs=cfg.base_model)
    dist = Dist.init()
    if dist.world > 1:
        raise UserError("`reward train` runs in one process (it trains the M models one after "
                        "another); run it without torchrun")
    base = reward_from_causal_lm(cfg.base_model[0], head_seed=cfg.seed)
    group = init_group(base)
    base_dropout = getattr(base.config, "attention_dropout", 0.0)
    enc = Encoder(cfg.base_model[0], base.config.pad_token_id, cfg.seq_len)
    ids = list(zip(enc([p.prompt for p in pairs], [p.chosen for p in pairs]),
                   enc([p.prompt for p in pairs], [p.rejected for p in pairs]), strict=True))
    n_params = sum(p.numel() for p in base.parameters())
    print(f"reward train: {cfg.num_models} model(s) of {n_params / 1e6:.2f}M parameters on "
          f"{len(pairs):,} pairs ({sum(p.flipped for p in pairs)} marked flipped)"
          + (", Baklava inits" if len(cfg.base_model) > 1 else ", one shared init"),
          file=sys.stderr)
    with atomic_output(out, cfg.overwrite) as tmp:
        metrics = open(tmp / "metrics.jsonl", "w")  # noqa: SIM115

        def log(rec: dict) -> None:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()

        summary = []
        for i in range(cfg.num_models):
            hp = draw_hparams(cfg, i)
            init = cfg.base_model[i if len(cfg.base_model) > 1 else 0]
            if len(cfg.base_model) > 1 and i > 0:
                model = reward_from_causal_lm(init, head_seed=cfg.seed)
            else:
                model = copy.deepcopy(base)
            name = f"rm-{i:02d}"
            res = train_one(model, ids, hp, cfg, enc.pad_id, dist.device, log, name)
            set_dropout(model, base_dropout)
            meta = {**hp, "init_from": str(init), "init_group": group, **res}
            save_reward_model(model, tmp / name, Path(init), meta)
            summary.append({"model": name, **meta})
            print(f"{name}: lr {hp['lr']:.2e}, dropout {hp['dropout']:.3f}, seed {hp['seed']}: "
                  f"loss {res['final_loss']:.4f}, train acc {res['final_train_acc']:.3f}, "
                  f"{res['pairs_per_s']:.1f} pairs/s", file=sys.stderr)
            del model
        metrics.close()
        (tmp / "reward_train.json").write_text(json.dumps(
            {"models": summary, "pairs": len(pairs), "params": n_params}, indent=1) + "\n")
        cfg.save(tmp / "config.yaml")
    print(f"done -> {out}", file=sys.stderr)
    return 0
