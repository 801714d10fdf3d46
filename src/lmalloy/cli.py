"""The `lmalloy` entry point: one table of subcommands -> (config class, main function).

Both are named as "module:attr" strings and imported only when that subcommand runs, so
`lmalloy --help` imports neither torch nor transformers. Config modules import only
pydantic; heavy imports live inside the main functions.

Every subcommand takes `--config FILE.yaml` plus flags named after its config's fields;
flags override the file. A `UserError` is one line on stderr and exit code 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from lmalloy.errors import UserError, unknown

# name -> (config class, main function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "data list": ("lmalloy.data.config:DataListConfig",
        "lmalloy.data.corpus:list_main",
        "list a corpus's domains and sizes"),
    "tokenizer": ("lmalloy.data.config:TokenizerConfig",
        "lmalloy.data.tokenizer:main",
        "train a byte-level BPE tokenizer and save it as an HF tokenizer"),
    "pretrain": ("lmalloy.train.config:PretrainConfig",
        "lmalloy.train.run:pretrain",
        "pretrain a Llama-architecture LM from text (TinyLlama recipe)"),
    "finetune": ("lmalloy.train.config:FinetuneConfig",
        "lmalloy.train.run:finetune",
        "fine-tune an HF checkpoint on another corpus or domain"),
    "eval": ("lmalloy.eval.config:EvalConfig",
        "lmalloy.eval.perplexity:main",
        "perplexity and bits per byte of models on a corpus or domain"),
    "inspect": ("lmalloy.io.inspect:InspectConfig",
        "lmalloy.io.inspect:main",
        "architecture, parameters, dtypes, shards and vocabulary of a model folder"),
    "average": ("lmalloy.average.config:AverageConfig",
        "lmalloy.average.offline:main",
        "average checkpoints of one run (uniform, last K, EMA), streaming"),
    "merge": ("lmalloy.merge.config:MergeConfig",
        "lmalloy.merge.engine:main",
        "merge fine-tunes of one base (soup, TIES, DARE, SLERP, ...) or LoRA adapters; takes mergekit YAML"),
    "merge search": ("lmalloy.merge.config:SearchConfig",
        "lmalloy.merge.search:main",
        "choose a merge's weights/densities/lambda from ranges on held-out loss or accuracy (nevergrad)"),
    "merge extract-lora": ("lmalloy.merge.config:ExtractLoraConfig",
        "lmalloy.merge.extract:main",
        "a full fine-tune minus its base as a PEFT LoRA adapter (truncated SVD per module)"),
    "merge lorahub": ("lmalloy.merge.config:LorahubConfig",
        "lmalloy.merge.lora:lorahub_main",
        "learn LoraHub weights for LoRA adapters from a few examples"),
    "moe build": ("lmalloy.moe.config:MoeBuildConfig",
        "lmalloy.moe.build:main",
        "Mixtral MoE from dense models: upcycle, compose (mergekit-moe YAML), btx"),
    "moe analyze": ("lmalloy.moe.config:MoeAnalyzeConfig",
        "lmalloy.moe.analyze:main",
        "routing statistics vs random baselines, expert shares, tokens by expert"),
    "proxy generate": ("lmalloy.proxy.config:ProxyGenerateConfig",
        "lmalloy.proxy.run:generate_main",
        "generate with a large model steered by a small tuned/untuned pair"),
    "proxy eval": ("lmalloy.proxy.config:ProxyEvalConfig",
        "lmalloy.proxy.run:eval_main",
        "perplexity/accuracy of large, proxy-tuned and tuned large; gap closed"),
    "serve": ("lmalloy.serve.config:ServeConfig",
        "lmalloy.serve.app:main",
        "OpenAI-compatible HTTP server over a model or a proxy-tuned ensemble"),
    "reward data": ("lmalloy.reward.config:RewardDataConfig",
        "lmalloy.reward.data:main",
        "preference pairs from a corpus: real code vs corrupted, with label noise"),
    "reward train": ("lmalloy.reward.config:RewardTrainConfig",
        "lmalloy.reward.train:main",
        "fine-tune M pairwise (Bradley-Terry) reward models from one init"),
    "reward warm": ("lmalloy.reward.config:RewardWarmConfig",
        "lmalloy.reward.warm:main",
        "weight-average reward models into one (WARM)"),
    "reward eval": ("lmalloy.reward.config:RewardEvalConfig",
        "lmalloy.reward.evaluate:main",
        "accuracy, memorisation and best-of-N of RMs, their ensemble and WARM"),
    "demo": ("lmalloy.demo.config:DemoConfig",
        "lmalloy.demo.run:main",
        "the end-to-end demo on the built-in corpus; writes runs/demo/report.html"),
}


def _load(ref: str) -> Any:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def _top_help() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: lmalloy COMMAND [--config FILE.yaml] [--flags ...] [--debug]", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`lmalloy COMMAND --help` lists a command's flags (also its YAML keys)."]
    return "\n".join(lines)


def _split_command(argv: list[str]) -> tuple[str, list[str]]:
    if len(argv) >= 2 and f"{argv[0]} {argv[1]}" in COMMANDS:
        return f"{argv[0]} {argv[1]}", argv[2:]
    if argv[0] in COMMANDS:
        return argv[0], argv[1:]
    groups = {n.split()[0] for n in COMMANDS if " " in n}
    if argv[0] in groups:
        subs = [n.split()[1] for n in COMMANDS if n.startswith(argv[0] + " ")]
        word = argv[1] if len(argv) > 1 else ""
        if word in ("", "-h", "--help", "help"):
            raise _GroupHelp(argv[0])
        raise unknown(f"`{argv[0]}` subcommand", word, subs)
    names = {n.split()[0] for n in COMMANDS}
    raise unknown("command", argv[0], names)


class _GroupHelp(Exception):
    """`lmalloy GROUP` or `lmalloy GROUP --help`: list the group's subcommands."""


def _group_help(group: str) -> str:
    names = [n for n in COMMANDS if n.startswith(group + " ")]
    width = max(len(n) for n in names)
    return "\n".join([f"usage: lmalloy {group} SUBCOMMAND [--flags ...]", "", "subcommands:"]
                     + [f"  {n:<{width}}  {COMMANDS[n][2]}" for n in names]
                     + ["", f"`lmalloy {group} SUBCOMMAND --help` lists its flags."])


def setup_threads(cfg) -> None:
    """`--threads N` of any command: torch's intra-op threads, set once before the work."""
    from lmalloy.config import _extra

    field = type(cfg).model_fields.get("threads")
    n = getattr(cfg, "threads", None)
    if n and field is not None and _extra(field).get("torch_threads"):
        import torch

        torch.set_num_threads(n)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise UserError(f"{self.prog}: {message}")


def parse(name: str, argv: list[str]):
    """Build the command's config from `--config` and flags. Returns the validated config."""
    from lmalloy import config as C

    cls = _load(COMMANDS[name][0])
    parser = _Parser(prog=f"lmalloy {name}", description=COMMANDS[name][2],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with this command's keys (flags override it)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    C.add_arguments(parser, cls)
    has_positional = any(isinstance(f.json_schema_extra, dict) and
                         f.json_schema_extra.get("positional") for f in cls.model_fields.values())
    if argv and not has_positional and argv[0].endswith((".yaml", ".yml")) \
            and not argv[0].startswith("-"):
        argv = ["--config", *argv]  # `lmalloy merge config.yaml` == `--config config.yaml`
    ns = parser.parse_args(argv)
    data = C.load_yaml(ns.config) if ns.config else {}
    if hasattr(cls, "from_file_data"):  # e.g. merge accepting mergekit's YAML
        data = cls.from_file_data(data)
    data = C.deep_merge(C._normalise_keys(cls, data), C.overrides_from_namespace(cls, ns))
    return C.validate(cls, data)


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning: on a shared or busy CPU, spinning
    # threads slowed training steps 2-40x in our measurements. Set before torch loads;
    # export OMP_WAIT_POLICY=ACTIVE to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LMALLOY_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0
    if argv[0] in ("-V", "--version"):
        from lmalloy import __version__

        print(f"lmalloy {__version__}")
        return 0
    try:
        name, rest = _split_command(argv)
        cfg = parse(name, rest)
        setup_threads(cfg)
        result = _load(COMMANDS[name][1])(cfg)
        return int(result) if isinstance(result, int) else 0
    except _GroupHelp as g:
        print(_group_help(str(g)))
        return 0
    except UserError as e:
        if debug:
            raise
        print(f"lmalloy: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmalloy: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmalloy inspect ... | head`: the reader left; stop quietly
        sys.stdout = None
        return 0


if __name__ == "__main__":
    sys.exit(main())
