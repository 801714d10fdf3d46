"""Where a DDP run keeps its weight averages: one EMA shadow, three places, 2 processes.

    torchrun --nproc-per-node 2 bench/average_ddp.py [--preset small] [--rounds 15]

Every DDP process holds the same replica of the model, so an average can live:
- replicated: every process keeps the whole fp32 shadow and updates it;
- rank 0: only rank 0 keeps and updates it (the others wait for it at the next all-reduce;
  evaluating it leaves them idle);
- sharded (what lmalloy does): each process keeps `torch.chunk(p, world)[rank]` of every
  parameter (`lmalloy.train.dist.ParamShards`, FSDP2's own layout) and updates it locally;
  the parts are gathered (an all-gather per tensor) only to evaluate or save.

Reported per option: shadow MB held by each process; update ms per optimizer step (between
two barriers, so the slowest process sets it: that is what the step pays); gather ms per
evaluation or save (sharded only). A DDP training step (forward + backward + all-reduce +
AdamW, 4 × 256 tokens per process) is measured beside them for scale. Options are
interleaved round by round (medians), the model's weights perturbed between rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo")
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmalloy.average.averagers import EMA
    from lmalloy.train.dist import Dist, ParamShards
    from lmalloy.train.presets import model_kwargs

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**model_kwargs(a.preset, 4096)))
    n_params = sum(p.numel() for p in model.parameters())
    shards = ParamShards(model, Dist(rank, world))
    options = {"replicated": EMA(model, 0.99),
               "rank 0": EMA(model, 0.99) if rank == 0 else None,
               "sharded": EMA(model, 0.99, local=shards.local)}
    times: dict[str, list[float]] = {k: [] for k in options}
    gather: list[float] = []
    for _ in range(a.rounds):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3)
        for name, ema in options.items():
            dist.barrier()
            t0 = time.perf_counter()
            if ema is not None:
                ema.update(model)
            dist.barrier()
            times[name].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        for n, v in options["sharded"].average().items():
            shards.full(n, v)
        dist.barrier()
        gather.append(time.perf_counter() - t0)
    step = _train_step_ms(DDP(model), a.rounds // 3 or 1)
    mb = {k: (0.0 if e is None else sum(t.numel() * 4 for t in e.shadow) / 1e6)
          for k, e in options.items()}
    mbs = [None] * world
    dist.all_gather_object(mbs, mb)
    if rank == 0:
        print(f"{a.preset}: {n_params / 1e6:.2f}M parameters, {world} processes, "
              f"{a.threads} thread(s) each; DDP train step {step:.0f} ms")
        print("| option | shadow MB per process | update ms per step | % of step | "
              "gather ms per eval/save |")
        print("|---|---|---|---|---|")
        for k in options:
            ms = 1e3 * statistics.median(times[k])
            held = " / ".join(f"{m[k]:.1f}" for m in mbs)
            g = f"{1e3 * statistics.median(gather):.1f}" if k == "sharded" else "0"
            print(f"| {k} | {held} | {ms:.2f} | {100 * ms / step:.2f}% | {g} |")
    dist.destroy_process_group()


def _train_step_ms(ddp, steps: int) -> float:
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    x = torch.randint(0, 4096, (4, 256))
    out = []
    for _ in range(steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        loss = ddp(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        out.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(out[1:])


if __name__ == "__main__":
    main()
