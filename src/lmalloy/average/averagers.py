"""EMA, SWA and LaWA: weight averages of one training run, kept in fp32.

- **EMA**: avg ← decay·avg + (1 − decay)·w every `update_every` optimizer steps, as
  `torch._foreach_lerp_(avg, w, 1 − decay)`. timm's `ModelEmaV3` warmup: at update t
  (optimizer steps since `start`, minus one) decay_t = clamp(1 − (1 + t/γ)^(−p), min_decay,
  decay), and decay 0 (a plain copy) at t ≤ 0 — so the first update copies the weights.
- **SWA** (Izmailov et al. 2018): the running mean avg ← avg + (w − avg)/n over the steps
  start, start + every, …, as `_foreach_lerp_(avg, w, 1/n)` (torch's
  `get_swa_multi_avg_fn`). `swa_lr_lambda` adds the optional SWA learning-rate phase.
- **LaWA** (Kaddour 2022; Sanyal et al. 2306.03241 for LLM pretraining: k = 5 snapshots
  200 steps apart, started early, high peak lr): the uniform mean of the latest k
  snapshots taken every `every` steps, computed as (s₁ + … + s_k)/k in snapshot order.
  Memory mode keeps k fp32 copies; disk mode writes each snapshot as a safetensors file
  and streams the k files into a single fp32 accumulator (one extra copy in memory).

Shadows are fp32 whatever the model's dtype (a bf16 model's updates would otherwise
round away: 1 − 0.999 of a bf16 step is below its resolution). They live on the model's
device and are keyed by `named_parameters()` names. Given `local` (a parameter -> this
process's part of it), an averager keeps and updates only that part: under torchrun the
trainer passes FSDP2's shard, or an equal slice of each DDP replica, so the averages are
sharded like the parameters and their updates need no communication.

Python API, the same for all three:
    ema = EMA(model, decay=0.999)
    for step ...: opt.step(); ema.update(model)
    ema.average()        # {name: fp32 tensor} (None before the first averaged step)
    ema.state_dict(); ema.load_state_dict(sd)   # tensors + plain python (weights_only)
    ema.save("ema-model", tokenizer="tok/")     # an ordinary HF folder

`Averaging` is the trainer callback behind `lmalloy pretrain --average ema,swa,lawa`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from lmalloy.errors import UserError

SNAP_RE = re.compile(r"^step-(\d{6,})\.safetensors$")


# ----------------------------------------------------------------------------- pure helpers


def ema_decay(t: int, decay: float, warmup: bool = False, gamma: float = 1.0,
              power: float = 2 / 3, min_decay: float = 0.0) -> float:
    """The EMA decay at update t (timm's ModelEmaV3.get_decay); 0 (a copy) for t <= 0."""
    if t <= 0:
        return 0.0
    if not warmup:
        return decay
    return max(min(1 - (1 + t / gamma) ** -power, decay), min_decay)


def swa_lr_lambda(base: Callable[[int], float], start: int, ratio: float,
                  anneal: str = "cos", steps: int = 10) -> Callable[[int], float]:
    """LR multiplier with an SWA phase: `base` before optimizer step `start` (0-based), then
    `ratio` (= swa_lr / peak lr) at once, or cosine-annealed from base(start) over `steps`."""
    a0 = base(start)

    def f(s: int) -> float:
        if s < start:
            return base(s)
        if anneal == "constant":
            return ratio
        p = min(1.0, (s - start) / steps)
        return ratio + (a0 - ratio) * 0.5 * (1 + math.cos(math.pi * p))

    return f


def hf_state(model: nn.Module, avg: dict[str, torch.Tensor], dtype: torch.dtype | None = None
             ) -> dict[str, torch.Tensor]:
    """The model's state dict as `save_pretrained` stores it (tied aliases left out) with
    averaged parameters, cast to `dtype` (default: each tensor's dtype in the model), on CPU."""
    from lmalloy.io.models import saved_state

    pname = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for k, v in model.state_dict(keep_vars=True).items():
        n = pname.get(id(v))
        t = avg[n] if n is not None and n in avg else v.detach()
        out[k] = t.to(device="cpu", dtype=dtype or v.dtype)
    return saved_state(model, out)


def _check_unit(name: str, v: float) -> None:
    if not 0 < v < 1:
        raise ValueError(f"{name} must be in (0, 1), got {v}")


# ----------------------------------------------------------------------------- averagers


class _Averager:
    """Shared parts: parameter names, the fp32 view of a model's parameters, saving."""

    kind = ""

    def __init__(self, model: nn.Module,
                 local: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.local = local or (lambda p: p)
        self.sharded = local is not None
        self.step = 0
        self._cache: tuple[nn.Module, list[torch.Tensor]] | None = None

    def _src(self, model: nn.Module) -> list[torch.Tensor]:
        """This process's part of the model's parameters in `self.names` order, as fp32 (a
        no-op for fp32)."""
        if self._cache is None or self._cache[0] is not model:
            params = dict(model.named_parameters())
            missing = [n for n in self.names if n not in params]
            if missing:
                raise ValueError(f"model has no parameter `{missing[0]}`")
            self._cache = (model, [params[n] for n in self.names])
        return [self.local(p).detach().float() for p in self._cache[1]]

    def _advance(self, step: int | None) -> int:
        self.step = self.step + 1 if step is None else int(step)
        return self.step

    def average(self) -> dict[str, torch.Tensor] | None:
        raise NotImplementedError

    def save(self, path: str | Path, dtype: torch.dtype | None = None,
             tokenizer: str | Path | None = None, overwrite: bool = False) -> Path:
        """Write the average as an HF folder (config from the model, tokenizer files copied
        from `tokenizer` if given), atomically."""
        from lmalloy.io.writer import atomic_output, copy_aux_files, write_state_dict

        if self.sharded:
            raise ValueError(f"{self.kind}: this process holds only its part of the average "
                             "(`local`); the trainer gathers the parts to write them")
        avg = self.average()
        if avg is None:
            raise ValueError(f"{self.kind}: nothing averaged yet (step {self.step})")
        state = hf_state(self.model, avg, dtype)
        with atomic_output(path, overwrite) as tmp:
            cfg = getattr(self.model, "config", None)
            if cfg is not None:
                cfg.architectures = [type(self.model).__name__]
                cfg.save_pretrained(tmp)
            gen = getattr(self.model, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(tmp)
            write_state_dict(tmp, state)
            if tokenizer is not None:
                copy_aux_files(tokenizer, tmp)
        return Path(path)


class EMA(_Averager):
    """Exponential moving average of the weights (timm-style optional decay warmup)."""

    kind = "ema"

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False,
                 gamma: float = 1.0, power: float = 2 / 3, min_decay: float = 0.0,
                 update_every: int = 1, start: int = 0, local=None):
        super().__init__(model, local)
        _check_unit("decay", decay)
        self.decay, self.warmup, self.gamma, self.power = decay, warmup, gamma, power
        self.min_decay, self.update_every, self.start = min_decay, max(1, update_every), start
        self.shadow = [p.clone() for p in self._src(model)]  # fp32 copies

    def decay_at(self, step: int) -> float:
        return ema_decay(step - self.start - 1, self.decay, self.warmup, self.gamma,
                         self.power, self.min_decay)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Call after each optimizer step (`step`: 1-based count of steps done)."""
        s = self._advance(step)
        if s % self.update_every:
            return
        d = self.decay_at(s)
        if d == 0.0:
            torch._foreach_copy_(self.shadow, self._src(model))
        else:
            torch._foreach_lerp_(self.shadow, self._src(model), 1.0 - d)

    def average(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow, strict=True))

    def state_dict(self) -> dict:
        return {"step": self.step, "shadow": self.average()}

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["step"])
        with torch.no_grad():
            for t, n in zip(self.shadow, self.names, strict=True):
                t.copy_(sd["shadow"][n])


class SWA(_Averager):
    """Stochastic weight averaging: the equal-weight mean of the weights at steps
    start, start + every, … (a running mean, no stored snapshots)."""

    kind = "swa"

    def __init__(self, model: nn.Module, start: int = 1, every: int = 1, local=None):
        super().__init__(model, local)
        self.start, self.every = max(1, int(start)), max(1, every)
        self.n = 0
        self.avg: list[torch.Tensor] | None = None

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        s = self._advance(step)
        if s < self.start or (s - self.start) % self.every:
            return
        src = self._src(model)
        if self.avg is None:
            self.avg = [p.clone() for p in src]
        else:
            torch._foreach_lerp_(self.avg, src, 1.0 / (self.n + 1))
        self.n += 1

    def average(self) -> dict[str, torch.Tensor] | None:
        return None if self.avg is None else dict(zip(self.names, self.avg, strict=True))

    def state_dict(self) -> dict:
        return {"step": self.step, "n": self.n, "avg": self.average()}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.n = int(sd["step"]), int(sd["n"])
        if sd["avg"] is None:
            self.avg = None
        else:
            dev = self._src(self.model)[0].device
            self.avg = [sd["avg"][n].to(dev, torch.float32).clone() for n in self.names]


class LaWA(_Averager):
    """Latest-weight averaging: the mean of the latest k snapshots taken every `every`
    steps (fewer while fewer exist). `folder` set: snapshots live on disk there."""

    kind = "lawa"

    def __init__(self, model: nn.Module, k: int = 5, every: int = 200, start: int = 0,
                 folder: str | Path | None = None, local=None):
        super().__init__(model, local)
        self.k, self.every, self.start = max(1, k), max(1, every), start
        self.folder = Path(folder) if folder is not None else None
        self.steps: list[int] = []  # snapshot steps in the window, oldest first
        self.snaps: list[list[torch.Tensor]] = []  # memory mode
        self.marks: list[int] = []  # window starts at the last two state_dict() calls
        self._avg: list[torch.Tensor] | None = None

    def _file(self, step: int) -> Path:
        return self.folder / f"step-{step:06d}.safetensors"

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        s = self._advance(step)
        if s < self.start or s % self.every:
            return
        src = self._src(model)
        if self.folder is None:
            self.snaps.append([p.clone() for p in src])
            self.snaps = self.snaps[-self.k:]
        else:
            from safetensors.torch import save_file

            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".step-{s:06d}.tmp"
            save_file({n: p.to("cpu").contiguous() for n, p in zip(self.names, src,
                                                                   strict=True)}, str(tmp))
            os.replace(tmp, self._file(s))
        self.steps = [*self.steps, s][-self.k:]
        self._avg = None
        self._prune()

    def _prune(self) -> None:
        """Disk mode: delete snapshots older than both the window and the window of the
        previous saved state (so a resume from either of the last two checkpoints finds
        its files)."""
        if self.folder is None or not self.steps:
            return
        keep_from = min([self.steps[0], *self.marks[-2:-1]] if len(self.marks) >= 2 else
                        [self.steps[0], *self.marks[-1:]])
        for p in self.folder.iterdir():
            m = SNAP_RE.match(p.name)
            if m and int(m.group(1)) < keep_from:
                p.unlink(missing_ok=True)

    @torch.no_grad()
    def average(self) -> dict[str, torch.Tensor] | None:
        if not self.steps:
            return None
        if self._avg is None:
            n = len(self.steps)
            if self.folder is None:
                acc = [p.clone() for p in self.snaps[0]]  # (s1 + ... + sn) / n in order
                for snap in self.snaps[1:]:
                    torch._foreach_add_(acc, snap)
                torch._foreach_div_(acc, float(n))
            else:
                acc = self._average_files(n)
            self._avg = acc
        return dict(zip(self.names, self._avg, strict=True))

    def _average_files(self, n: int) -> list[torch.Tensor]:
        from safetensors import safe_open

        dev = self._src(self.model)[0].device
        handles = []
        for s in self.steps:
            f = self._file(s)
            if not f.is_file():
                raise UserError(f"LaWA snapshot {f} is missing (disk mode)")
            handles.append(safe_open(str(f), framework="pt"))
        acc = []
        for name in self.names:  # one tensor of every file at a time
            t = handles[0].get_tensor(name).to(dev, torch.float32).clone()
            for h in handles[1:]:
                t.add_(h.get_tensor(name).to(dev))
            acc.append(t.div_(float(n)))
        return acc

    def state_dict(self) -> dict:
        if self.steps:
            self.marks = [*self.marks, self.steps[0]][-2:]
        sd = {"step": self.step, "steps": list(self.steps), "marks": list(self.marks)}
        if self.folder is None:
            sd["snapshots"] = [dict(zip(self.names, s, strict=True)) for s in self.snaps]
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["step"])
        self.steps = [int(s) for s in sd["steps"]]
        self.marks = [int(s) for s in sd["marks"]]
        self._avg = None
        if self.folder is None:
            dev = self._src(self.model)[0].device
            self.snaps = [[s[n].to(dev, torch.float32).clone() for n in self.names]
                          for s in sd["snapshots"]]


# ----------------------------------------------------------------------------- trainer callback


class Averaging:
    """Trainer callback for `--average`: updates the averagers after every optimizer step,
    has them evaluated beside the raw model, writes `<checkpoint>/<name>/` HF folders and
    keeps their state in the checkpoint so `--resume` continues them exactly.

    Under torchrun each process keeps its part of every average (`trainer.shards.local`:
    FSDP2's shard, an equal slice of a DDP replica), updated locally; the parts are
    gathered only to evaluate and to write the HF folders."""

    def __init__(self, names: list[str], ema, swa, lawa, world: int = 1):
        self.names = list(names)
        self.settings = {"ema": ema, "swa": swa, "lawa": lawa}
        self.averagers: dict[str, _Averager] = {}
        self.world = world  # processes of the run
        self._pending: dict | None = None

    def swa_start(self, total_steps: int) -> int:
        s = self.settings["swa"].start
        return max(1, round(s * total_steps)) if s < 1 else int(s)

    def wrap_lr_lambda(self, trainer, f: Callable[[int], float]) -> Callable[[int], float]:
        sw = self.settings["swa"]
        if "swa" not in self.names or sw.lr is None:
            return f
        return swa_lr_lambda(f, self.swa_start(trainer.total_steps), sw.lr / trainer.cfg.lr,
                             sw.anneal, sw.anneal_steps)

    def on_train_start(self, trainer) -> None:
        self.world = trainer.dist.world
        model, local = trainer.model, trainer.shards.local if self.world > 1 else None
        for name in self.names:
            st = self.settings[name]
            if name == "ema":
                a = EMA(model, st.decay, st.warmup, st.gamma, st.power, st.min_decay,
                        st.update_every, st.start, local=local)
            elif name == "swa":
                a = SWA(model, self.swa_start(trainer.total_steps), st.every, local=local)
            else:
                folder = None
                if st.mode == "disk":  # each process's part of each snapshot
                    folder = trainer.out / "averaging" / "lawa"
                    if self.world > 1:
                        folder = folder / f"rank-{trainer.dist.rank}"
                a = LaWA(model, st.k, st.every, st.start, folder, local=local)
            a.step = trainer.step
            self.averagers[name] = a
        if self._pending is not None:
            self.load_state_dict(self._pending)

    def on_step_end(self, trainer, step: int) -> None:
        for a in self.averagers.values():
            a.update(trainer.model, step)

    def eval_states(self, trainer) -> dict[str, dict[str, torch.Tensor]]:
        """{average: {parameter: this process's part}} of the averages that exist yet."""
        out = {}
        for name, a in self.averagers.items():
            avg = a.average()
            if avg is not None:
                out[name] = avg
        return out

    def save(self, trainer, folder: Path) -> None:
        for name, avg in self.eval_states(trainer).items():
            trainer.write_hf(folder / name, average=avg)

    def state_dict(self) -> dict:
        return {"world": self.world, **{name: a.state_dict()
                                        for name, a in self.averagers.items()}}

    def load_state_dict(self, sd: dict) -> None:
        was = sd.get("world", 1)
        if was != self.world and "lawa" in self.names and self.settings["lawa"].mode == "disk":
            raise UserError(f"--resume: the LaWA snapshots on disk (--lawa.mode disk) hold "
                            f"the parts of {was} process(es); resume with {was}, not "
                            f"{self.world}")
        if not self.averagers:  # called before on_train_start: apply once they exist
            self._pending = sd
            return
        for name, a in self.averagers.items():
            if name in sd:
                a.load_state_dict(sd[name])
        self._pending = None
