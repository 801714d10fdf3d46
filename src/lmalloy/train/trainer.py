"""The trainer behind `pretrain` and `finetune`: TinyLlama's recipe on any HF causal LM.

- AdamW (β1, β2) = (0.9, 0.95), weight decay 0.1 on matrices only (not norms, biases),
  gradient clipping 1.0, linear warmup then cosine decay to lr·min_lr_ratio.
- Global batch in tokens = micro batch × seq_len × accumulation steps × processes.
- Under `torchrun`: DDP (gloo on CPU, nccl on GPU) or FSDP2 (`fully_shard` per decoder
  layer). Every process reads the same deterministic data order and takes its own slice
  of each global batch, so N processes see exactly the batches one process would.
- Checkpoints are HF folders `checkpoints/step-NNNNNN/` with the state to resume from
  beside the weights (`lmalloy.train.checkpoint`: optimizer, scheduler, RNG states, step,
  callback states), written atomically by all processes together. The data position is a
  function of the step, so `--resume` continues exactly.
- MFU uses the PaLM formula: 6·N + 12·L·d·T FLOPs per token, N = parameters excluding the
  input embedding, against `peak_tflops` (GPU table, or a measured fp32 matmul peak on CPU).

Callbacks (the averagers use them) may implement: `on_train_start(trainer)`,
`on_step_end(trainer, step)`, `eval_states(trainer) -> {name: state_dict}` (evaluated
beside the raw model), `save(trainer, folder)`, `state_dict()`, `load_state_dict(sd)`,
`wrap_lr_lambda(trainer, f) -> f` (e.g. SWA's learning-rate phase). Every process calls
them. State that follows the parameters is kept as this process's part of each one
(`trainer.shards.local(p)`: FSDP2's shard, or an equal slice of a DDP replica), in dicts
keyed by parameter name; `trainer.write_hf(folder, average=...)` and the evaluation
gather it.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lmalloy.errors import UserError
from lmalloy.io.runs import METRICS_FILE, checkpoint_dir, list_checkpoints
from lmalloy.io.writer import copy_aux_files
from lmalloy.train.dist import Dist, ParamShards

# ----------------------------------------------------------------------------- helpers


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak lr at step s (0-based): linear warmup, cosine to min_ratio."""

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _n, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: nn.Module, weight_decay: float, lr: float, betas: tuple[float, float],
          device: torch.device) -> torch.optim.AdamW:
    """TinyLlama's AdamW (decay on matrices only, eps 1e-8), fused on CPU and CUDA: one
    kernel per step, on CPU ~5x torch's default per-tensor loop (measured)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=1e-8,
                             fused=device.type in ("cuda", "cpu"))


def flops_per_token(cfg, seq_len: int, n_params: int) -> float:
    embed = cfg.vocab_size * cfg.hidden_size
    return 6 * (n_params - embed) + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40": 181.0, "A10": 125.0,
                   "4090": 165.0, "V100": 125.0, "T4": 65.0}


def measure_peak_tflops(device: torch.device) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for k, v in GPU_PEAK_TFLOPS.items():
            if k in name:
                return v
        return 100.0
    # best of three 0.1 s windows of a 1024² fp32 matmul: a busy machine depresses one window
    n = 1024
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        k = 0
        while time.perf_counter() - t0 < 0.1:
            a @ b
            k += 1
        best = max(best, 2 * n**3 * k / (time.perf_counter() - t0))
    return best / 1e12


# ----------------------------------------------------------------------------- trainer


@dataclass
class TrainData:
    folder: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray
    token_bytes: np.ndarray
    tokenizer_dir: Path


class Trainer:
    def __init__(self, cfg, model: nn.Module, data: TrainData, out: Path, dist: Dist,
                 callbacks: list | None = None, config_to_save: dict | None = None):
        from lmalloy.data.pack import EpochSampler

        self.cfg = cfg
        self.dist = dist
        self.out = out
        self.data = data
        self.callbacks = callbacks or []
        self.hf_config = model.config
        self.arch = type(model).__name__
        self.generation_config = getattr(model, "generation_config", None)
        self.model = model.to(dist.device)
        world = dist.world
        T = cfg.seq_len
        per_pass = T * cfg.micro_batch_size * world
        if cfg.global_batch_tokens % per_pass:
            raise UserError(
                f"`--global-batch-tokens` {cfg.global_batch_tokens} must be a multiple of "
                f"--seq-len × --micro-batch-size × processes = {T}×{cfg.micro_batch_size}×"
                f"{world} = {per_pass}")
        self.accum = cfg.global_batch_tokens // per_pass
        self.batch_seqs = cfg.global_batch_tokens // T
        pool = -(-cfg.unique_tokens // T) if cfg.unique_tokens else None
        self.sampler = EpochSampler(len(data.train), T, cfg.seed, pool)
        if self.sampler.num_chunks < 1:
            raise UserError(f"the training split has {len(data.train)} tokens, fewer than one "
                            f"sequence of --seq-len {T}")
        if cfg.max_steps:
            self.total_steps = cfg.max_steps
        elif cfg.max_tokens:
            self.total_steps = math.ceil(cfg.max_tokens / cfg.global_batch_tokens)
        else:
            self.total_steps = max(1, math.ceil((cfg.epochs or 1.0) * self.sampler.num_chunks
                                                / self.batch_seqs))
        self.warmup = (cfg.warmup_steps if cfg.warmup_steps is not None
                       else min(2000, int(0.05 * self.total_steps)))
        self.n_params = sum(p.numel() for p in model.parameters())
        # MoE (Mixtral): router balance loss in train_step, per-layer expert load logged
        from lmalloy.train.moe import moe_spec

        spec = moe_spec(self.hf_config)
        self.moe = spec.experts if spec else None
        self.moe_k = spec.top_k if spec else None
        self.moe_acc: list = []
        n_active = self.n_params
        if spec:  # experts a token does not use (SwiGLU: 3 matrices each)
            n_active -= ((spec.experts - spec.top_k) * len(spec.sparse_layers) * 3
                         * self.hf_config.hidden_size * spec.expert_ffn)
        self.flops_tok = flops_per_token(self.hf_config, T, n_active)
        self.peak = (cfg.peak_tflops or measure_peak_tflops(dist.device)) * 1e12
        self.wrapped = self._wrap(model)
        self.shards = ParamShards(self.model, dist)
        self.opt = adamw(self.model, cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2),
                         dist.device)
        f = lr_lambda(self.warmup, self.total_steps, cfg.min_lr_ratio)
        for cb in self.callbacks:  # e.g. the SWA learning-rate phase
            if hasattr(cb, "wrap_lr_lambda"):
                f = cb.wrap_lr_lambda(self, f)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, f)
        self.step = 0
        self.config_to_save = config_to_save or {}
        self.history: list[dict] = []

    # -- setup
    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.cfg.activation_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise UserError(f"--activation-checkpointing: {self.arch} does not support "
                                "activation checkpointing")
            model.gradient_checkpointing_enable({"use_reentrant": False})
        if self.dist.world > 1 and self.cfg.distributed == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            wrapped = model
        elif self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model, device_ids=[self.dist.local_rank] if
                          self.dist.device.type == "cuda" else None)
        else:
            wrapped = model
        if self.cfg.compile:
            from lmalloy.io.models import compiler_missing

            why = compiler_missing(self.dist.device.type)
            if why is None:
                wrapped = torch.compile(wrapped)
            elif self.dist.main:  # fall back: the same run, eager
                print(f"lmalloy: warning: --compile: torch.compile is unavailable here ({why}); "
                      "training eagerly", file=sys.stderr)
        return wrapped

    @property
    def fsdp(self) -> bool:
        return self.dist.world > 1 and self.cfg.distributed == "fsdp"

    # -- data
    def micro_batches(self, step: int):
        """This process's micro-batches of global step `step`."""
        B, mbs, world = self.batch_seqs, self.cfg.micro_batch_size, self.dist.world
        base = step * B
        for m in range(self.accum):
            start = base + (m * world + self.dist.rank) * mbs
            x, y = self.sampler.batch(self.data.train, start, mbs)
            yield x.to(self.dist.device), y.to(self.dist.device)

    # -- eval
    def evaluate(self) -> dict:
        from lmalloy.train.heldout import evaluate

        spans = {n: tuple(d["val"]) for n, d in self.data.meta["domains"].items()}
        if not any(b > a for a, b in spans.values()):
            return {}
        cfg = self.cfg

        def run() -> dict:
            return evaluate(self.model, self.data.val, spans, cfg.seq_len, cfg.eval_tokens,
                            self.data.token_bytes, cfg.micro_batch_size,
                            cfg.precision == "bf16", per_window=cfg.eval_windows)

        res = {"raw": run()}
        for cb in self.callbacks:
            if hasattr(cb, "eval_states"):
                for name, state in cb.eval_states(self).items():
                    with swapped_weights(self.shards, state):
                        res[name] = run()
        return res

    # -- checkpoints
    def save_checkpoint(self, step: int) -> Path:
        from lmalloy.train.checkpoint import save

        target = checkpoint_dir(self.out, step)
        save(self, step, target)
        if self.dist.main and self.cfg.keep_checkpoints:
            for _s, p in list_checkpoints(self.out)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(p, ignore_errors=True)
        self.dist.barrier()
        return target

    def write_hf(self, folder: Path, average: dict[str, torch.Tensor] | None = None) -> None:
        """An HF folder of the model, or of `average` (this process's part of each averaged
        parameter, `shards.local` layout): config.json, weights, generation config,
        tokenizer files. Every process calls it (the weights are gathered); rank 0 writes."""
        from lmalloy.train.checkpoint import whole, write_weights

        self.shards.reshard()
        sd = self.model.state_dict(keep_vars=True)
        avg = average or {}

        def fetch(k: str) -> torch.Tensor:
            return self.shards.full(k, avg[k]) if k in avg else whole(sd[k])

        main = self.dist.main
        if main:
            folder.mkdir(exist_ok=True)
            self.hf_config.architectures = [self.arch]
            self.hf_config.save_pretrained(folder)
            if self.generation_config is not None:
                self.generation_config.save_pretrained(folder)
            copy_aux_files(self.data.tokenizer_dir, folder)
        write_weights(folder if main else None, self.model, fetch)

    def load_checkpoint(self, path: Path) -> None:
        from lmalloy.train.checkpoint import load

        load(self, path)

    # -- metrics
    def log(self, record: dict) -> None:
        if not self.dist.main:
            return
        self.history.append(record)
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        p = self.out / METRICS_FILE
        if not (self.dist.main and p.is_file()):
            return
        keep = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        keep = [r for r in keep if r.get("step", 0) <= step]
        p.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self.history = keep

    # -- the loop
    def fit(self) -> dict:
        cfg = self.cfg
        save_every = cfg.save_every or cfg.eval_every
        for cb in self.callbacks:
            if hasattr(cb, "on_train_start"):
                cb.on_train_start(self)
        bar = None
        if self.dist.main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                       disable=None,
                       file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
        self._window = _LogWindow(time.perf_counter(), self.step)
        last_eval: dict = {}
        self.wrapped.train()
        while self.step < self.total_steps:
            self._window.add(self.train_step(self.step))
            self.step += 1
            for cb in self.callbacks:
                if hasattr(cb, "on_step_end"):
                    cb.on_step_end(self, self.step)
            done = self.step == self.total_steps
            if self.step % cfg.log_every == 0 or done:
                self._log_train(bar)
            if self.step % cfg.eval_every == 0 or done:
                with self._window.paused():
                    last_eval = self.evaluate()
                    if last_eval:
                        self.log({**self._position(), "eval": last_eval})
            if self.step % save_every == 0 or done:
                with self._window.paused():
                    self.save_checkpoint(self.step)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return last_eval

    def _position(self) -> dict:
        return {"step": self.step, "tokens": self.step * self.cfg.global_batch_tokens,
                "epoch": self.step * self.batch_seqs / self.sampler.num_chunks}

    def _log_train(self, bar) -> None:
        """One training record: the only host sync and all-reduce of the logged values."""
        w = self._window
        dt = time.perf_counter() - w.t0
        tps = (self.step - w.step0) * self.cfg.global_batch_tokens / max(dt, 1e-9)
        rec = {**self._position(), "loss": self.dist.all_mean(float(w.loss / w.n)),
               "lr": self.sched.get_last_lr()[0], "tokens_per_s": tps,
               "mfu": tps * self.flops_tok / self.peak}
        if self.moe_acc:  # mean balance loss and (L, E) expert load since the last log
            rec["aux_loss"] = float(torch.stack([a for a, _ in self.moe_acc]).mean())
            rec["expert_load"] = torch.stack([x for _, x in self.moe_acc]).mean(0).tolist()
            self.moe_acc = []
        self.log(rec)
        if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tps:,.0f}",
                            mfu=f"{100 * rec['mfu']:.1f}%")
        self._window = _LogWindow(time.perf_counter(), self.step)

    def _forward_loss(self, x, y):
        """(LM loss, objective) of one micro-batch; the MoE balance loss joins the objective."""
        with torch.autocast(self.dist.device.type, dtype=torch.bfloat16,
                            enabled=self.cfg.precision == "bf16"):
            out = (self.wrapped(input_ids=x, output_router_logits=True) if self.moe
                   else self.wrapped(input_ids=x))
            logits = out.logits
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                           y.reshape(-1))
        if not self.moe:
            return loss, loss
        from lmalloy.train.moe import router_aux

        aux, load = router_aux(out.router_logits, self.moe, self.moe_k)
        self.moe_acc.append((aux.detach(), load))
        coef = getattr(self.hf_config, "router_aux_loss_coef", 0.01)
        return loss, loss + coef * aux

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step; returns its mean loss as a device tensor (no host sync but
        the one finiteness check, which refuses to step on a NaN/Inf loss or gradient)."""
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.dist.device)
        for m, (x, y) in enumerate(self.micro_batches(step)):
            last = m == self.accum - 1
            ctx = (self.wrapped.no_sync() if self.dist.world > 1 and not last and
                   hasattr(self.wrapped, "no_sync") else contextlib.nullcontext())
            if self.fsdp:
                self.wrapped.set_requires_gradient_sync(last)
            with ctx:
                loss, objective = self._forward_loss(x, y)
                (objective / self.accum).backward()
            total += loss.detach()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self._check_finite(step, total, gnorm)
        self.opt.step()
        self.sched.step()
        return total / self.accum

    def _check_finite(self, step: int, loss: torch.Tensor, gnorm) -> None:
        if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor
            gnorm = gnorm.full_tensor()
        bad = (~(torch.isfinite(loss) & torch.isfinite(gnorm))).float().reshape(1)
        if self.dist.world > 1:
            import torch.distributed as tdist

            tdist.all_reduce(bad, op=tdist.ReduceOp.MAX)
        if bool(bad):
            last = list_checkpoints(self.out)
            kept = f"; the last good checkpoint, {last[-1][1]}, is kept" if last else ""
            raise UserError(f"step {step + 1}: the loss ({float(loss) / self.accum:.4g}) or "
                            f"gradient norm ({float(gnorm):.4g}) is not finite; stopped "
                            f"before the optimizer step{kept} (lower --lr, or check the "
                            "data and the initial weights)")


@dataclass
class _LogWindow:
    """The steps since the last training log: summed loss (a device tensor) and timing."""

    t0: float
    step0: int
    loss: float | torch.Tensor = 0.0
    n: int = 0

    def add(self, loss: torch.Tensor) -> None:
        self.loss = loss if self.n == 0 else self.loss + loss
        self.n += 1

    @contextlib.contextmanager
    def paused(self):
        """Evaluation and checkpoint time do not count in tokens/s."""
        t = time.perf_counter()
        yield
        self.t0 += time.perf_counter() - t


class swapped_weights:
    """Temporarily put `state` ({parameter name: this process's part}, `ParamShards.local`
    layout) into the model, restoring its own weights on exit."""

    def __init__(self, shards, state: dict[str, torch.Tensor]):
        self.shards = shards
        self.state = state

    def __enter__(self):
        sh = self.shards
        sh.reshard()
        self.saved = {n: sh.local(sh.params[n]).detach().clone() for n in self.state}
        for n, v in self.state.items():
            sh.assign(n, v)
        return self

    def __exit__(self, *a):
        self.shards.reshard()
        for n, v in self.saved.items():
            self.shards.assign(n, v)
        return False
