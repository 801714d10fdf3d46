"""The hostile suite: one row per bad input, every command.

Each row runs `lmalloy ...` in-process on tiny models and asserts what the README promises
for a mistake: exit code 2, exactly one line on stderr (`lmalloy: error: ...`) holding the
expected fragment, no traceback, nothing written (the row's output does not exist and no
temporary folder is left beside it) and nothing destroyed (an output that existed is
untouched). Rows of the `fast` kind are mistakes a config or a header reveals: they must
fail in under 2 s (measured in-process, after the suite's imports: the command's own
work before it refuses).
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common import make_adapter, make_llama, make_tokenizer, run_cli

FAST_S = 2.0


@dataclass
class Row:
    id: str
    args: object  # (zoo, out) -> list of CLI words
    match: str
    fast: bool = True
    exists: bool = False  # the output exists beforehand (a folder, or a file if it has a dot)
    env: dict | None = None  # environment variables set for the row (e.g. torchrun's)


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _edit_weights(src: Path, dst: Path, fn) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    fn(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _raw_header(src: Path, dst: Path, fn) -> Path:
    """A copy whose safetensors header is rewritten by `fn(header dict)`."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    fn(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    f.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    return dst


class Zoo:
    """Every bad (and good) input the rows need, built once."""

    def __init__(self, root: Path, tok: Path, llama: Path):
        from lmalloy.cli import main

        self.root, self.tok, self.llama = root, tok, llama
        self.llama2 = make_llama(root / "llama2", tok, seed=7)
        self.wide = make_llama(root / "wide", tok, intermediate=96)
        self.deep = make_llama(root / "deep", tok, layers=3)
        self.h64 = make_llama(root / "h64", tok, hidden=64)
        self.tied = make_llama(root / "tied", tok, tie=True)
        self.tied_empty = _edit_weights(self.tied, root / "tied_empty", lambda sd: [
            sd.pop(k) for k in [k for k in sd if "embed" in k or "lm_head" in k]])
        tok2 = make_tokenizer(root / "tok2", vocab_size=300)
        self.other_tok = make_llama(root / "other_tok", tok2, vocab=320)
        self.no_tok = make_llama(root / "no_tok")
        self.mistral = _edit_config(llama, root / "mistral", architectures=["MistralForCausalLM"],
                                    model_type="mistral")
        self.phi3 = _edit_config(llama, root / "phi3", architectures=["Phi3ForCausalLM"],
                                 model_type="phi3")
        self.cfg_array = root / "cfg_array"
        shutil.copytree(llama, self.cfg_array)
        (self.cfg_array / "config.json").write_text("[1, 2]")
        self.cfg_bad = root / "cfg_bad"
        shutil.copytree(llama, self.cfg_bad)
        (self.cfg_bad / "config.json").write_text("{not json")
        self.no_cfg = root / "no_cfg"
        shutil.copytree(llama, self.no_cfg)
        (self.no_cfg / "config.json").unlink()

        def nan(sd):
            sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")

        self.nan = _edit_weights(llama, root / "nan", nan)
        self.missing = _edit_weights(llama, root / "missing",
                                     lambda sd: sd.pop("model.norm.weight"))
        self.extra = _edit_weights(llama, root / "extra", lambda sd: sd.__setitem__(
            "model.layers.9.mlp.up_proj.weight", torch.zeros(4, 4)))
        self.truncated = root / "truncated"
        shutil.copytree(llama, self.truncated)
        f = self.truncated / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
        self.bad_dtype = _raw_header(llama, root / "bad_dtype", lambda h: h[
            "model.norm.weight"].__setitem__("dtype", "Q4"))
        self.bad_entry = _raw_header(llama, root / "bad_entry",
                                     lambda h: h.__setitem__("model.norm.weight", 5))
        self.not_st = root / "not_st"
        shutil.copytree(llama, self.not_st)
        (self.not_st / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00notjson!")
        self.pickle = root / "pickle"
        shutil.copytree(llama, self.pickle)
        torch.save(load_file(self.pickle / "model.safetensors"),
                   self.pickle / "pytorch_model.bin")
        (self.pickle / "model.safetensors").unlink()
        self.empty_dir = root / "empty_dir"
        self.empty_dir.mkdir()
        self.text_file = root / "notes.txt"
        self.text_file.write_text("hello")
        # a corpus of two small domains
        self.data = root / "data"
        for d, text in (("alpha", "def f(x):\n    return x + 1\n"),
                        ("beta", "class A:\n    def g(self):\n        pass\n")):
            (self.data / d).mkdir(parents=True)
            for j in range(4):
                (self.data / d / f"f{j}.py").write_text(text * 40)
        # a training run with checkpoints (for average --last and --resume)
        self.run = root / "run"
        assert main(["pretrain", "--preset", "tiny", "--data", str(self.data), "--seq-len",
                     "32", "--global-batch-tokens", "256", "--micro-batch-size", "4",
                     "--max-steps", "2", "--eval-every", "1", "--eval-tokens", "256",
                     "--tokenizer", str(tok), "--out", str(self.run), "--no-progress",
                     "--threads", "1"]) == 0
        # reward models: two of one init, one of another
        self.rms = [self._rm(root / f"rm{i}", seed=0) for i in range(2)]
        self.rm_other = self._rm(root / "rm_other", seed=5)
        self.rm_nan = _edit_weights(self.rms[0], root / "rm_nan", lambda sd: sd[
            "score.weight"].fill_(float("inf")))
        # adapters
        ad = root / "adapters"
        self.ad = [make_adapter(ad / "a", llama, 4, 8, 1), make_adapter(ad / "b", llama, 4, 8, 2)]
        self.ad_wide = make_adapter(ad / "w", self.wide, 4, 8, 3)
        self.ad_mods = make_adapter(ad / "m", llama, 4, 8, 4,
                                    modules=["model.layers.0.self_attn.q_proj"])
        self.ad_nan = root / "ad_nan"
        shutil.copytree(self.ad[0], self.ad_nan)
        sd = load_file(self.ad_nan / "adapter_model.safetensors")
        next(iter(sd.values()))[0, 0] = float("nan")
        save_file(sd, self.ad_nan / "adapter_model.safetensors")
        self.ad_nor = root / "ad_nor"
        shutil.copytree(self.ad[0], self.ad_nor)
        cfg = json.loads((self.ad_nor / "adapter_config.json").read_text())
        cfg.pop("r")
        (self.ad_nor / "adapter_config.json").write_text(json.dumps(cfg))
        self.ad_other_base = []  # a/base and b/base: same basename, different models
        for name, m in (("x", llama), ("y", self.llama2)):
            shutil.copytree(m, root / name / "base")
            self.ad_other_base.append(make_adapter(root / name / "lora", root / name / "base",
                                                   4, 8, 9))
        # an MoE (4 experts, upcycled)
        self.moe = root / "moe"
        assert main(["moe", "build", "--method", "upcycle", "--base-model", str(llama),
                     "--num-experts", "4", "--out", str(self.moe)]) == 0
        self.moe8 = root / "moe8"
        assert main(["moe", "build", "--method", "upcycle", "--base-model", str(llama),
                     "--num-experts", "8", "--out", str(self.moe8)]) == 0
        # JSONL files
        good = {"prompt": "a", "chosen": "b", "rejected": "c"}
        self.pairs = root / "pairs.jsonl"
        self.pairs.write_text("\n".join(json.dumps(good) for _ in range(8)) + "\n")
        self.pairs_bad = root / "pairs_bad.jsonl"
        self.pairs_bad.write_text(json.dumps(good) + '\n{"prompt": "a"}\n')
        self.empty = root / "empty.jsonl"
        self.empty.write_text("")
        self.prompts_bad = root / "prompts_bad.jsonl"
        self.prompts_bad.write_text('{"text": 1}\n')
        self.choices_bad = root / "choices_bad.jsonl"
        self.choices_bad.write_text('{"context": "a", "choices": ["b"], "answer": 0}\n')
        self.long_prompt = "x " * 400  # beyond the tiny models' 256 positions
        self.yaml = {}

    def _rm(self, path: Path, seed: int) -> Path:
        from lmalloy.reward.model import reward_from_causal_lm
        from lmalloy.reward.train import init_group, save_reward_model

        m = reward_from_causal_lm(self.llama, head_seed=seed)
        save_reward_model(m, path, self.llama, {"init_group": init_group(m)})
        return path

    def file(self, name: str, text: str) -> Path:
        p = self.root / "files" / name
        p.parent.mkdir(exist_ok=True)
        p.write_text(text)
        return p


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tokenizer_dir, tiny_llama):
    return Zoo(tmp_path_factory.mktemp("zoo"), tokenizer_dir, tiny_llama)


def P(z: Zoo, **kw):  # a pretrain command line with the zoo's corpus and tokenizer
    args = ["pretrain", "--preset", "tiny", "--data", str(z.data), "--seq-len", "32",
            "--global-batch-tokens", "256", "--micro-batch-size", "4", "--max-steps", "2",
            "--tokenizer", str(z.tok), "--no-progress"]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def yaml_file(z: Zoo, name: str, text: str) -> Path:
    return z.file(name, text)


def one_slice(z: Zoo, name: str, model, first: int, end: int, method: str = "passthrough",
              key: str = "layer_range") -> Path:
    """A merge YAML of one slice of one source."""
    return z.file(name, f"slices:\n  - sources: [{{model: {model}, {key}: [{first}, {end}]}}]"
                  f"\nmerge_method: {method}\n")


M = "merge"


def SY(z: Zoo, o: Path, params: str, method: str = "ties", mp: str = "{weight: 1.0}",
       models=None, extra: str = "") -> list:
    """`merge search` on a space YAML (written beside the row's output) and the zoo's data."""
    models = models or [z.llama2]
    y = o.parent / "space.yaml"
    y.parent.mkdir(parents=True, exist_ok=True)
    y.write_text(f"merge_method: {method}\nbase_model: {z.llama}\nmodels:\n"
                 + "".join(f"  - model: {m}\n    parameters: {mp}\n" for m in models)
                 + f"parameters: {params}\n{extra}")
    return [M, "search", y, "--data", z.data, "--domains", "alpha", "--seq-len", "32",
            "--val-fraction", "0.3", "--out", o]


def _log_beside(o: Path, header: dict) -> Path:
    """An interrupted search's log beside the row's output."""
    work = o.parent / f".{o.name}.search"
    work.mkdir(parents=True, exist_ok=True)
    (work / "search.jsonl").write_text(json.dumps(header) + "\n")
    return o


LAM = "{lambda: {range: [0.5, 1.5]}}"
ROWS: list[Row] = [
    # ------------------------------------------------------------------ the CLI itself
    Row("cli-unknown-command", lambda z, o: ["mege"], "did you mean `merge`"),
    Row("cli-unknown-subcommand", lambda z, o: ["moe", "buld"], "did you mean `build`"),
    Row("cli-unknown-flag", lambda z, o: ["inspect", z.llama, "--jsn"], "unrecognized"),
    Row("cli-missing-positional", lambda z, o: ["inspect"], "missing argument PATH"),
    Row("cli-config-missing", lambda z, o: ["eval", z.llama, "--config", z.root / "none.yaml"],
        "config file not found"),
    Row("cli-config-list", lambda z, o: ["eval", z.llama, "--config",
                                         z.file("list.yaml", "- a\n- b\n")], "mapping"),
    Row("cli-config-invalid-yaml", lambda z, o: ["eval", z.llama, "--config",
                                                 z.file("bad.yaml", "a: [1,\n")], "not valid YAML"),
    Row("cli-config-unknown-key", lambda z, o: ["eval", z.llama, "--config",
                                                z.file("k.yaml", "seq_lem: 5\n")],
        "did you mean `seq_len`"),
    Row("cli-alias-twice", lambda z, o: ["average", z.llama, z.llama2, "--out", o, "--output",
                                         z.root / "x"], "name the same setting"),
    Row("cli-bad-int", lambda z, o: ["eval", z.llama, "--seq-len", "many"], "`--seq-len`"),
    # ------------------------------------------------------------------ data list / tokenizer
    Row("data-unknown-domain", lambda z, o: ["data", "list", "--domains", "nope"], "nope"),
    Row("data-missing-path", lambda z, o: ["data", "list", "--data", z.root / "nowhere"],
        "not found"),
    Row("data-empty-folder", lambda z, o: ["data", "list", "--data", z.empty_dir], "no text"),
    Row("data-cap-zero", lambda z, o: ["data", "list", "--max-chars-per-domain", "0"],
        "--max-chars-per-domain"),
    Row("tokenizer-vocab-small", lambda z, o: ["tokenizer", "--vocab-size", "100", "--out", o],
        "at least 258"),
    Row("tokenizer-vocab-huge", lambda z, o: ["tokenizer", "--vocab-size", str(2**40),
                                              "--out", o], "too large"),
    Row("tokenizer-out-exists", lambda z, o: ["tokenizer", "--data", z.data, "--out", o],
        "already exists", exists=True),
    Row("tokenizer-missing-data", lambda z, o: ["tokenizer", "--data", z.root / "nowhere",
                                                "--out", o], "not found"),
    # ------------------------------------------------------------------ inspect
    Row("inspect-missing", lambda z, o: ["inspect", z.root / "nowhere"], "not found"),
    Row("inspect-truncated", lambda z, o: ["inspect", z.truncated], "truncated"),
    Row("inspect-bad-dtype", lambda z, o: ["inspect", z.bad_dtype], "unknown dtype `Q4`"),
    Row("inspect-bad-entry", lambda z, o: ["inspect", z.bad_entry], "malformed"),
    Row("inspect-not-safetensors", lambda z, o: ["inspect", z.not_st], "not JSON"),
    Row("inspect-config-array", lambda z, o: ["inspect", z.cfg_array], "JSON object"),
    Row("inspect-config-invalid", lambda z, o: ["inspect", z.cfg_bad], "not valid JSON"),
    Row("inspect-pickle", lambda z, o: ["inspect", z.pickle], "--allow-pickle"),
    Row("inspect-text-file", lambda z, o: ["inspect", z.text_file], "expected a model folder"),
    # ------------------------------------------------------------------ pretrain
    Row("pretrain-unknown-preset", lambda z, o: P(z, preset="huge", out=o),
        "unknown preset `huge`"),
    Row("pretrain-seq-beyond-context", lambda z, o: P(z, seq_len=4096, out=o),
        "above the tiny model's maximum"),
    Row("pretrain-unknown-domain", lambda z, o: P(z, domains="gamma", out=o), "gamma"),
    Row("pretrain-resume-nothing", lambda z, o: P(z, out=o) + ["--resume"], "no run to resume"),
    Row("pretrain-resume-and-overwrite", lambda z, o: P(z, out=o) + ["--resume", "--overwrite"],
        "exclude each other"),
    Row("pretrain-resume-changed", lambda z, o: ["pretrain", "--out", z.run, "--resume",
                                                 "--lr", "0.5"], "changed config"),
    Row("pretrain-out-exists", lambda z, o: P(z, out=o), "already exists", exists=True),
    Row("pretrain-override-typo", lambda z, o: P(z, out=o) + ["--model-overrides",
                                                              "{hiden_size: 128}"],
        "did you mean `hidden_size`"),
    Row("pretrain-override-moe-key", lambda z, o: P(z, out=o) + ["--model-overrides",
                                                                 "{num_local_experts: 4}"],
        "MoE presets only"),
    Row("pretrain-batch-not-multiple", lambda z, o: P(z, global_batch_tokens=300, out=o),
        "must be a multiple"),
    Row("pretrain-vocab-small", lambda z, o: P(z, vocab_size=10, out=o), "at least 258"),
    Row("pretrain-tokenizer-missing", lambda z, o: P(z, tokenizer=z.root / "nowhere", out=o),
        "tokenizer"),
    Row("pretrain-unknown-averager", lambda z, o: P(z, average="swe", out=o),
        "unknown averager"),
    Row("pretrain-negative-lr", lambda z, o: P(z, lr=-1, out=o), "`--lr`"),
    Row("pretrain-zero-epochs", lambda z, o: P(z, epochs=0, out=o), "`--epochs`"),
    Row("pretrain-device-cuda-absent", lambda z, o: P(z, device="cuda", out=o),
        "no CUDA device is available"),
    Row("pretrain-device-malformed", lambda z, o: P(z, device="gpu0", out=o),
        "is not a torch device"),
    Row("pretrain-fsdp-without-torchrun", lambda z, o: P(z, distributed="fsdp", out=o),
        "torchrun"),
    Row("pretrain-dist-timeout-zero", lambda z, o: P(z, dist_timeout=0, out=o),
        "`--dist-timeout`"),
    # torchrun's variables for rank 0 of 2, the other never coming (port 0: any free one)
    Row("pretrain-process-group-never-forms", lambda z, o: P(z, dist_timeout=1, out=o),
        "did not form within --dist-timeout 1 s", fast=False,
        env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": "0"}),
    Row("pretrain-corpus-too-small", lambda z, o: P(z, seq_len=1000, global_batch_tokens=4000,
                                                    domains="alpha", out=o)
        + ["--max-chars-per-domain", "50"],
        "fewer than one sequence", fast=False),
    # ------------------------------------------------------------------ finetune
    Row("finetune-device-cuda-absent", lambda z, o: ["finetune", "--base-model", z.llama,
                                                     "--device", "cuda", "--out", o],
        "no CUDA device is available"),
    Row("finetune-base-missing", lambda z, o: ["finetune", "--base-model", z.root / "nowhere",
                                               "--out", o], "not found"),
    Row("finetune-base-no-tokenizer", lambda z, o: ["finetune", "--base-model", z.no_tok,
                                                    "--out", o], "tokenizer"),
    Row("finetune-seq-beyond", lambda z, o: ["finetune", "--base-model", z.llama, "--seq-len",
                                             "4096", "--out", o], "maximum of 256"),
    Row("finetune-freeze-nothing", lambda z, o: ["finetune", "--base-model", z.llama,
                                                 "--freeze", "nope", "--out", o],
        "matches no parameter"),
    Row("finetune-bad-regex", lambda z, o: ["finetune", "--base-model", z.llama,
                                            "--train-only", "(", "--out", o], "bad pattern"),
    Row("finetune-nothing-trainable", lambda z, o: ["finetune", "--base-model", z.llama,
                                                    "--freeze", ".", "--out", o],
        "no trainable parameter", fast=False),
    Row("finetune-out-in-base", lambda z, o: ["finetune", "--base-model", z.llama2, "--out",
                                              z.llama2 / "sub"], "overlaps"),
    Row("finetune-nan-base", lambda z, o: ["finetune", "--base-model", z.nan, "--data",
                                           z.data, "--out", o], "contains NaN or Inf",
        fast=False),
    Row("finetune-missing-tensor", lambda z, o: ["finetune", "--base-model", z.missing,
                                                 "--data", z.data, "--out", o],
        "lacks 1 weight", fast=False),
    Row("finetune-pickle", lambda z, o: ["finetune", "--base-model", z.pickle, "--out", o],
        "--allow-pickle"),
    Row("finetune-unknown-domain", lambda z, o: ["finetune", "--base-model", z.llama, "--data",
                                                 z.data, "--domains", "gamma", "--out", o],
        "gamma", fast=False),
    Row("finetune-out-exists", lambda z, o: ["finetune", "--base-model", z.llama, "--out", o],
        "already exists", exists=True),
    # ------------------------------------------------------------------ eval
    Row("eval-missing", lambda z, o: ["eval", z.root / "nowhere"], "not found"),
    Row("eval-seq-beyond", lambda z, o: ["eval", z.llama, "--seq-len", "4096"], "maximum of 256"),
    Row("eval-tokenizers-differ", lambda z, o: ["eval", z.llama, z.other_tok, "--data", z.data],
        "tokenizers of"),
    Row("eval-nan", lambda z, o: ["eval", z.nan, "--data", z.data, "--split", "all"],
        "contains NaN or Inf", fast=False),
    Row("eval-missing-tensor", lambda z, o: ["eval", z.missing, "--data", z.data],
        "lacks 1 weight", fast=False),
    Row("eval-extra-tensor", lambda z, o: ["eval", z.extra, "--data", z.data],
        "does not use", fast=False),
    Row("eval-unknown-domain", lambda z, o: ["eval", z.llama, "--data", z.data, "--domains",
                                             "gamma"], "gamma"),
    Row("eval-no-tokens", lambda z, o: ["eval", z.llama, "--data", z.data, "--val-fraction",
                                        "0"], "no val tokens", fast=False),
    Row("eval-config-array", lambda z, o: ["eval", z.cfg_array], "JSON object"),
    Row("eval-reward-model", lambda z, o: ["eval", z.rms[0], "--data", z.data],
        "not a causal language model"),
    Row("eval-truncated", lambda z, o: ["eval", z.truncated], "truncated"),
    Row("eval-pickle", lambda z, o: ["eval", z.pickle], "--allow-pickle"),
    # ------------------------------------------------------------------ average
    Row("average-no-inputs", lambda z, o: ["average", "--out", o], "no input folders"),
    Row("average-last-no-ckpts", lambda z, o: ["average", z.llama, "--last", "2", "--out", o],
        "no checkpoints"),
    Row("average-last-too-many", lambda z, o: ["average", z.run, "--last", "9", "--out", o],
        "has only"),
    Row("average-last-two-inputs", lambda z, o: ["average", z.run, z.run, "--last", "2",
                                                 "--out", o], "takes one run folder"),
    Row("average-architectures", lambda z, o: ["average", z.llama, z.mistral, "--out", o],
        "architecture"),
    Row("average-layers", lambda z, o: ["average", z.llama, z.deep, "--out", o],
        "differ in `num_hidden_layers`"),
    Row("average-sizes", lambda z, o: ["average", z.llama, z.wide, "--out", o],
        "differ in `intermediate_size`"),
    Row("average-tie-disagree", lambda z, o: ["average", z.llama, z.tied, "--out", o],
        "disagree on `tie_word_embeddings`"),
    Row("average-tokenizers", lambda z, o: ["average", z.llama, z.other_tok, "--out", o],
        "tokenizers of"),
    Row("average-nan", lambda z, o: ["average", z.llama, z.nan, "--out", o],
        "contains NaN or Inf", fast=False),
    Row("average-ema-no-decay", lambda z, o: ["average", z.llama, z.llama2, "--method", "ema",
                                              "--out", o], "--decay"),
    Row("average-decay-uniform", lambda z, o: ["average", z.llama, z.llama2, "--decay", "0.9",
                                               "--out", o], "only to `--method ema`"),
    Row("average-out-exists", lambda z, o: ["average", z.llama, z.llama2, "--out", o],
        "already exists", exists=True),
    Row("average-out-in-input", lambda z, o: ["average", z.llama, z.llama2, "--out",
                                              z.llama2 / "avg"], "inside the input"),
    Row("average-truncated", lambda z, o: ["average", z.llama, z.truncated, "--out", o],
        "truncated"),
    Row("average-missing-tensor", lambda z, o: ["average", z.llama, z.missing, "--out", o],
        "lacks: `model.norm.weight`"),
    # ------------------------------------------------------------------ merge
    Row("merge-unknown-method", lambda z, o: [M, "--method", "tie", "--models",
                                              f"{z.llama},{z.llama2}", "--out", o],
        "did you mean `ties`"),
    Row("merge-needs-base", lambda z, o: [M, "--method", "ties", "--models",
                                          f"{z.llama},{z.llama2}", "--out", o],
        "needs a base model"),
    Row("merge-slerp-three", lambda z, o: [M, "--method", "slerp", "--base-model", z.llama,
                                           "--models", f"{z.llama2},{z.no_tok}", "--parameters",
                                           "t=0.5", "--out", o], "exactly two"),
    Row("merge-unknown-param", lambda z, o: [M, "--method", "ties", "--base-model", z.llama,
                                             "--models", z.llama2, "--parameters",
                                             "densty=0.5", "--out", o], "did you mean `density`"),
    Row("merge-density-range", lambda z, o: [M, "--method", "ties", "--base-model", z.llama,
                                             "--models", z.llama2, "--parameters",
                                             "weight=1,density=1.5", "--out", o], "must be in (0, 1]"),
    Row("merge-weights-sum-zero", lambda z, o: [M, "--models", f"{z.llama},{z.llama2}",
                                                "--weights", "1,-1", "--out", o], "sum to 0"),
    Row("merge-weights-count", lambda z, o: [M, "--models", f"{z.llama},{z.llama2}",
                                             "--weights", "1", "--out", o], "has 1 values"),
    Row("merge-yaml-models-int", lambda z, o: [M, yaml_file(z, "m5.yaml", "models: 5\n"),
                                               "--out", o], "models"),
    Row("merge-yaml-tokens", lambda z, o: [M, yaml_file(z, "tt.yaml", (
        f"models: [{z.llama}, {z.llama2}]\ntokenizer: {{source: base, tokens: {{a: 1}}}}\n")),
        "--out", o], "tokenizer.tokens"),
    Row("merge-yaml-named-template", lambda z, o: [M, yaml_file(z, "ct.yaml", (
        f"models: [{z.llama}, {z.llama2}]\nchat_template: chatml\n")), "--out", o],
        "Jinja"),
    Row("merge-slice-out-of-bounds", lambda z, o: [M, one_slice(z, "sl.yaml", z.llama, 0, 5),
                                                   "--out", o], "beyond its 2 layers"),
    Row("merge-slice-reversed", lambda z, o: [M, one_slice(z, "sr.yaml", z.llama, 2, 1),
                                              "--out", o], "empty or reversed"),
    Row("merge-slice-unknown-key", lambda z, o: [M, one_slice(z, "sk.yaml", z.llama, 0, 1,
                                                              key="layer_rage"),
                                                 "--out", o], "did you mean `layer_range`"),
    Row("merge-slice-unknown-method", lambda z, o: [M, one_slice(z, "sm.yaml", z.llama, 0, 1,
                                                                 "passtrough"),
                                                    "--out", o], "did you mean `passthrough`"),
    Row("merge-slice-hidden-sizes", lambda z, o: [M, yaml_file(z, "sh.yaml", (
        f"slices:\n  - sources: [{{model: {z.llama}, layer_range: [0, 1]}}]\n"
        f"  - sources: [{{model: {z.h64}, layer_range: [1, 2]}}]\n"
        "merge_method: passthrough\n")), "--out", o], "hidden_size"),
    Row("merge-slice-lengths", lambda z, o: [M, yaml_file(z, "sn.yaml", (
        f"slices:\n  - sources: [{{model: {z.llama}, layer_range: [0, 1]}}, "
        f"{{model: {z.deep}, layer_range: [0, 3]}}]\nmerge_method: linear\n")),
        "--out", o], "same number of layers"),
    Row("merge-slice-base-not-source", lambda z, o: [M, yaml_file(z, "sb.yaml", (
        f"slices:\n  - sources: [{{model: {z.llama2}, layer_range: [0, 2]}}]\n"
        f"merge_method: task_arithmetic\nbase_model: {z.llama}\n")), "--out", o],
        "not among its sources"),
    Row("merge-slice-passthrough-two", lambda z, o: [M, yaml_file(z, "s2.yaml", (
        f"slices:\n  - sources: [{{model: {z.llama}, layer_range: [0, 2]}}, "
        f"{{model: {z.llama2}, layer_range: [0, 2]}}]\nmerge_method: passthrough\n")),
        "--out", o], "slice 0: `passthrough` takes exactly 1"),
    Row("merge-slice-unknown-param", lambda z, o: [M, yaml_file(z, "sp.yaml", (
        f"slices:\n  - sources: [{{model: {z.llama}, layer_range: [0, 2]}}]\n"
        "    parameters: {scal: 0.5}\nmerge_method: passthrough\n")), "--out", o],
        "no parameter `scal` of slice 0"),
    Row("merge-slice-and-models", lambda z, o: [M, yaml_file(z, "sa.yaml", (
        f"models: [{z.llama}]\nslices:\n  - sources: [{{model: {z.llama}, layer_range: "
        "[0, 2]}]\nmerge_method: passthrough\n")), "--out", o], "not both"),
    Row("merge-yaml-modules", lambda z, o: [M, yaml_file(z, "mo.yaml", (
        "modules: {text_decoder: {}}\nmerge_method: passthrough\n")), "--out", o],
        "modules"),
    Row("merge-yaml-unknown-key", lambda z, o: [M, yaml_file(z, "uk.yaml", (
        f"models: [{z.llama}, {z.llama2}]\nbase_modle: {z.llama}\n")), "--out", o],
        "did you mean `base_model`"),
    Row("merge-architectures", lambda z, o: [M, "--models", f"{z.llama},{z.mistral}", "--out",
                                             o], "different architectures"),
    Row("merge-tie-disagree", lambda z, o: [M, "--models", f"{z.llama},{z.tied}", "--out", o],
        "disagree on `tie_word_embeddings`"),
    Row("merge-tied-no-embedding", lambda z, o: [M, "--models", f"{z.tied},{z.tied_empty}",
                                                 "--out", o], "neither `lm_head.weight`"),
    Row("merge-lacks-tensor", lambda z, o: [M, "--models", f"{z.llama},{z.missing}", "--out",
                                            o], "lacks 1 tensor"),
    Row("merge-shapes", lambda z, o: [M, "--models", f"{z.llama},{z.wide}", "--out", o],
        "intermediate_size"),
    Row("merge-tokenizers", lambda z, o: [M, "--models", f"{z.llama},{z.other_tok}", "--out",
                                          o], "tokenizers differ"),
    Row("merge-tokenizer-source-missing", lambda z, o: [M, "--models", f"{z.llama},{z.llama2}",
                                                        "--tokenizer-source", z.root / "no",
                                                        "--out", o], "neither base, union nor a folder"),
    Row("merge-nan-ties", lambda z, o: [M, "--method", "ties", "--base-model", z.llama,
                                        "--models", z.nan, "--parameters", "weight=1",
                                        "--out", o],
        "contains NaN or Inf", fast=False),
    Row("merge-nan-linear", lambda z, o: [M, "--models", f"{z.llama},{z.nan}", "--out", o],
        "contains NaN or Inf", fast=False),
    Row("merge-truncated", lambda z, o: [M, "--models", f"{z.llama},{z.truncated}", "--out", o],
        "truncated"),
    Row("merge-out-exists", lambda z, o: [M, "--models", f"{z.llama},{z.llama2}", "--out", o],
        "already exists", exists=True),
    Row("merge-out-in-input", lambda z, o: [M, "--models", f"{z.llama},{z.llama2}", "--out",
                                            z.llama / "m"], "inside the input"),
    Row("merge-trim-model-gradient", lambda z, o: [M, yaml_file(z, "tg.yaml", (
        f"merge_method: ties\nbase_model: {z.llama}\nmodels:\n  - model: {z.llama2}\n"
        "    parameters: {weight: 1, density: [0.2, 0.8]}\nties_trim: model\n")), "--out", o],
        "one density per model"),
    Row("merge-parameters-syntax", lambda z, o: [M, "--models", f"{z.llama},{z.llama2}",
                                                 "--parameters", "weight", "--out", o],
        "key=value"),
    Row("merge-empty-gradient", lambda z, o: [M, yaml_file(z, "eg.yaml", (
        f"models:\n  - model: {z.llama}\n    parameters: {{weight: []}}\n"
        f"  - model: {z.llama2}\n")), "--out", o], "empty list"),
    Row("merge-bad-filter", lambda z, o: [M, yaml_file(z, "bf.yaml", (
        f"models:\n  - model: {z.llama}\n    parameters: {{weight: [{{filtr: mlp, value: 1}}]}}"
        f"\n  - model: {z.llama2}\n")), "--out", o], "filtered entry"),
    Row("merge-weight-inf", lambda z, o: [M, "--models", f"{z.llama},{z.llama2}", "--weights",
                                          "1,inf", "--out", o], "finite"),
    Row("merge-greedy-seq-beyond", lambda z, o: [M, "--method", "greedy_soup", "--models",
                                                 f"{z.llama},{z.llama2}", "--seq-len", "4096",
                                                 "--out", o], "maximum of 256"),
    Row("merge-pickle", lambda z, o: [M, "--models", f"{z.llama},{z.pickle}", "--out", o],
        "--allow-pickle"),
    Row("merge-missing-model", lambda z, o: [M, "--models", f"{z.llama},{z.root / 'no'}",
                                             "--out", o], "not found"),
    Row("merge-config-array", lambda z, o: [M, "--models", f"{z.llama},{z.cfg_array}",
                                            "--out", o], "JSON object"),
    Row("merge-compute-dtype", lambda z, o: [M, "--models", f"{z.llama},{z.llama2}",
                                             "--compute-dtype", "int8", "--out", o],
        "--compute-dtype"),
    # ------------------------------------------------------------------ LoRA adapters
    Row("lora-svd-rank-huge", lambda z, o: [M, "--method", "svd", "--models",
                                            f"{z.ad[0]},{z.ad[1]}", "--rank", "1000", "--out",
                                            o], "full rank"),
    Row("lora-different-bases", lambda z, o: [M, "--method", "cat", "--models",
                                              f"{z.ad_other_base[0]},{z.ad_other_base[1]}",
                                              "--out", o], "different base models"),
    Row("lora-different-modules", lambda z, o: [M, "--method", "cat", "--models",
                                                f"{z.ad[0]},{z.ad_mods}", "--out", o],
        "different modules"),
    Row("lora-nan", lambda z, o: [M, "--method", "cat", "--models", f"{z.ad[0]},{z.ad_nan}",
                                  "--out", o], "contains NaN or Inf"),
    Row("lora-no-r", lambda z, o: [M, "--method", "cat", "--models", f"{z.ad[0]},{z.ad_nor}",
                                   "--out", o], "`r`"),
    Row("lora-mixed-with-model", lambda z, o: [M, "--method", "cat", "--models",
                                               f"{z.ad[0]},{z.llama}", "--out", o],
        "not a PEFT adapter"),
    Row("lora-bake-no-base", lambda z, o: [M, "--method", "bake", "--models", z.ad[0], "--out",
                                           o], "--base-model"),
    Row("lora-bake-wrong-base", lambda z, o: [M, "--method", "bake", "--models", z.ad[0],
                                              "--base-model", z.h64, "--out", o],
        "not this adapter's base"),
    Row("lora-cat-on-models", lambda z, o: [M, "--method", "cat", "--models",
                                            f"{z.llama},{z.llama2}", "--out", o],
        "merges PEFT adapter folders"),
    Row("lorahub-missing-adapter", lambda z, o: [M, "lorahub", z.root / "no", "--base-model",
                                                 z.llama, "--out", o], "not a PEFT adapter"),
    Row("lorahub-no-r", lambda z, o: [M, "lorahub", z.ad[0], z.ad_nor, "--base-model", z.llama,
                                      "--out", o], "`r`"),
    Row("lorahub-nan", lambda z, o: [M, "lorahub", z.ad[0], z.ad_nan, "--base-model", z.llama,
                                     "--out", o], "contains NaN or Inf"),
    Row("lorahub-wrong-base", lambda z, o: [M, "lorahub", z.ad[0], z.ad[1], "--base-model",
                                            z.h64, "--out", o], "not the adapters' base"),
    Row("lorahub-seq-beyond", lambda z, o: [M, "lorahub", z.ad[0], z.ad[1], "--base-model",
                                            z.llama, "--seq-len", "4096", "--out", o],
        "maximum of 256"),
    Row("lorahub-budget-zero", lambda z, o: [M, "lorahub", z.ad[0], z.ad[1], "--base-model",
                                             z.llama, "--budget", "0", "--out", o], "--budget"),
    Row("lorahub-out-exists", lambda z, o: [M, "lorahub", z.ad[0], z.ad[1], "--base-model",
                                            z.llama, "--out", o], "already exists", exists=True),
    Row("search-empty-range", lambda z, o: SY(z, o, "{lambda: {range: [1, 1]}}"), "is empty"),
    Row("search-reversed-range", lambda z, o: SY(z, o, "{lambda: {range: [2, 1]}}"),
        "is reversed"),
    Row("search-unknown-param", lambda z, o: SY(z, o, "{densty: {range: [0.2, 1]}}"),
        "did you mean `density`"),
    Row("search-budget-zero", lambda z, o: SY(z, o, LAM) + ["--budget", "0"], "`--budget`"),
    Row("search-bool-range", lambda z, o: SY(z, o, "{normalize: {range: [0, 1]}}"),
        "choice: [true, false]"),
    Row("search-param-bounds", lambda z, o: SY(z, o, "{density: {range: [0.0, 1.0]}}"),
        "must be in (0, 1]"),
    Row("search-global-per-model", lambda z, o: SY(z, o, "{}", mp="{weight: 1, lambda: "
                                                   "{range: [0, 1]}}"), "global parameter"),
    Row("search-fixed-key", lambda z, o: SY(z, o, LAM, extra="dtype: {choice: [float32, "
                                            "bfloat16]}\n"), "takes one fixed value"),
    Row("search-nothing", lambda z, o: SY(z, o, "{lambda: 1.0}"), "nothing to search"),
    Row("search-unknown-key", lambda z, o: SY(z, o, "{lambda: {range: [0, 1], steps: 4}}"),
        "unknown key `steps`"),
    Row("search-log-zero", lambda z, o: SY(z, o, "{lambda: {range: [0, 1], log: true}}"),
        "above 0"),
    Row("search-weights-and-range", lambda z, o: SY(z, o, "{}", mp="{weight: {range: [0, 1]}}")
        + ["--weights", "1"], "`--weights` fixes"),
    Row("search-greedy", lambda z, o: SY(z, o, LAM, method="greedy_soup"), "greedy_soup"),
    Row("search-adapter", lambda z, o: SY(z, o, LAM, models=z.ad), "PEFT adapter"),
    Row("search-choices-bad", lambda z, o: SY(z, o, LAM) + ["--choices", z.choices_bad],
        "line 1"),
    Row("search-accuracy-no-choices", lambda z, o: SY(z, o, LAM) + ["--objective", "accuracy"],
        "needs a multiple-choice"),
    Row("search-unknown-objective", lambda z, o: SY(z, o, LAM) + ["--objective", "ppl"],
        "`--objective`"),
    Row("search-seq-beyond", lambda z, o: SY(z, o, LAM) + ["--seq-len", "4096"],
        "maximum of 256"),
    Row("search-unknown-domain", lambda z, o: SY(z, o, LAM) + ["--domains", "gamma"], "gamma",
        fast=False),
    Row("search-out-exists", lambda z, o: SY(z, o, LAM), "already exists", exists=True),
    Row("search-resume-nothing", lambda z, o: SY(z, o, LAM) + ["--resume"],
        "no search to resume"),
    Row("search-interrupted", lambda z, o: SY(z, _log_beside(o, {"lmalloy_search": 1}), LAM),
        "--resume to continue"),
    Row("search-resume-other", lambda z, o: SY(z, _log_beside(o, {
        "lmalloy_search": 1, "identity": {"method": "linear"}}), LAM) + ["--resume"],
        "written for another search"),
    Row("search-resume-damaged", lambda z, o: SY(z, _log_beside(o, {"x": 1}), LAM)
        + ["--resume"], "not a `merge search` log"),
    Row("search-unknown-optimizer", lambda z, o: SY(z, o, LAM) + ["--optimizer", "NGopt"],
        "did you mean `NGOpt`", fast=False),
    Row("extract-shape", lambda z, o: [M, "extract-lora", z.wide, "--base-model", z.llama,
                                       "--rank", "2", "--out", o], "intermediate_size"),
    Row("extract-rank-huge", lambda z, o: [M, "extract-lora", z.llama2, "--base-model",
                                           z.llama, "--rank", "999", "--out", o], "exceeds"),
    Row("extract-no-rank", lambda z, o: [M, "extract-lora", z.llama2, "--base-model", z.llama,
                                         "--out", o], "exactly one of"),
    # ------------------------------------------------------------------ moe build
    Row("moe-zero-experts", lambda z, o: ["moe", "build", "--method", "upcycle",
                                          "--base-model", z.llama, "--num-experts", "0",
                                          "--out", o], "at least 2 experts"),
    Row("moe-unsupported-family", lambda z, o: ["moe", "build", "--method", "upcycle",
                                                "--base-model", z.phi3, "--out", o],
        "supported dense families: llama"),
    Row("moe-k-too-large", lambda z, o: ["moe", "build", "--method", "upcycle", "--base-model",
                                         z.llama, "--num-experts", "2", "--experts-per-token",
                                         "3", "--out", o], "more than the 2 experts"),
    Row("moe-hidden-no-prompts", lambda z, o: ["moe", "build", "--base-model", z.llama,
                                               "--experts", f"{z.llama2},{z.llama2}",
                                               "--out", o], "positive_prompts"),
    Row("moe-expert-shape", lambda z, o: ["moe", "build", "--base-model", z.llama, "--experts",
                                          f"{z.llama2},{z.wide}", "--gate-mode", "random",
                                          "--out", o], "differ in `intermediate_size`"),
    Row("moe-expert-tokenizer", lambda z, o: ["moe", "build", "--base-model", z.llama,
                                              "--experts", f"{z.llama2},{z.other_tok}",
                                              "--gate-mode", "random", "--out", o],
        "tokenizers of"),
    Row("moe-upcycle-source", lambda z, o: ["moe", "build", "--method", "upcycle",
                                            "--base-model", z.llama, "--experts", z.llama2,
                                            "--out", o], "no source_model"),
    Row("moe-compose-num-experts", lambda z, o: ["moe", "build", "--base-model", z.llama,
                                                 "--experts", f"{z.llama2},{z.llama2}",
                                                 "--num-experts", "2", "--gate-mode", "random",
                                                 "--out", o], "--num-experts is for upcycle"),
    Row("moe-compose-noise", lambda z, o: ["moe", "build", "--base-model", z.llama, "--experts",
                                           f"{z.llama2},{z.llama2}", "--noise", "0.1",
                                           "--gate-mode", "random", "--out", o],
        "--noise is for upcycle"),
    Row("moe-prompt-too-long", lambda z, o: ["moe", "build", "--config", yaml_file(
        z, "moe_long.yaml", json.dumps({
            "base_model": str(z.llama), "experts": [
                {"source_model": str(z.llama2), "positive_prompts": ["x " * 400]},
                {"source_model": str(z.llama2), "positive_prompts": ["def f():"]}]})),
        "--gate-mode", "cheap_embed", "--out", o], "longer than the base's context"),
    Row("moe-yaml-shared-experts", lambda z, o: ["moe", "build", yaml_file(z, "se.yaml", (
        f"base_model: {z.llama}\ngate_mode: random\nexperts: [{z.llama2}, {z.llama2}]\n"
        f"shared_experts: [{{source_model: {z.llama2}}}]\n")), "--out", o],
        "MixtralForCausalLM has no shared expert"),
    Row("moe-two-shared-experts", lambda z, o: ["moe", "build", yaml_file(z, "s2.yaml", (
        f"base_model: {z.llama}\ngate_mode: random\nexperts: [{z.llama2}, {z.llama2}]\n"
        f"shared_experts: [{z.llama2}, {z.llama2}]\n")), "--out", o], "at most one"),
    Row("moe-yaml-architecture", lambda z, o: ["moe", "build", yaml_file(z, "ar.yaml", (
        f"base_model: {z.llama}\ngate_mode: random\nexperts: [{z.llama2}, {z.llama2}]\n"
        "architecture: deepseek\n")), "--out", o], "unknown MoE architecture"),
    Row("moe-arch-mismatch", lambda z, o: ["moe", "build", "--method", "upcycle",
                                           "--base-model", z.llama, "--architecture",
                                           "qwen3_moe", "--out", o],
        "cannot become a qwen3_moe MoE"),
    Row("moe-yaml-allow-crimes", lambda z, o: ["moe", "build", yaml_file(z, "cr.yaml", (
        f"base_model: {z.llama}\ngate_mode: random\nexperts: [{z.llama2}, {z.llama2}]\n"
        "allow_crimes: true\n")), "--out", o], "allow_crimes"),
    Row("moe-yaml-tokenizer-source", lambda z, o: ["moe", "build", yaml_file(z, "ts.yaml", (
        f"base_model: {z.llama}\ngate_mode: random\nexperts: [{z.llama2}, {z.llama2}]\n"
        "tokenizer_source: union\n")), "--out", o], "tokenizer_source"),
    Row("moe-from-moe", lambda z, o: ["moe", "build", "--method", "upcycle", "--base-model",
                                      z.moe, "--out", o], "already a mixture of experts"),
    Row("moe-out-exists", lambda z, o: ["moe", "build", "--method", "upcycle", "--base-model",
                                        z.llama, "--num-experts", "2", "--out", o],
        "already exists", exists=True),
    Row("moe-nan-base", lambda z, o: ["moe", "build", "--method", "upcycle", "--base-model",
                                      z.nan, "--num-experts", "2", "--out", o],
        "NaN or Inf", fast=False),
    # ------------------------------------------------------------------ moe analyze
    Row("analyze-dense", lambda z, o: ["moe", "analyze", z.llama, "--out", o],
        "is a dense model"),
    Row("analyze-init-mismatch", lambda z, o: ["moe", "analyze", z.moe, "--init", z.moe8,
                                               "--out", o], "has 8 experts"),
    Row("analyze-seq-beyond", lambda z, o: ["moe", "analyze", z.moe, "--seq-len", "4096",
                                            "--out", o], "maximum of 256"),
    Row("analyze-html-layer", lambda z, o: ["moe", "analyze", z.moe, "--html-layers", "7",
                                            "--out", o], "does not exist"),
    Row("analyze-text-missing", lambda z, o: ["moe", "analyze", z.moe, "--text",
                                              z.root / "no.txt", "--out", o], "file not found"),
    Row("analyze-out-exists", lambda z, o: ["moe", "analyze", z.moe, "--out", o],
        "already exists", exists=True),
    Row("analyze-out-unwritable", lambda z, o: ["moe", "analyze", z.moe, "--out",
                                                z.text_file / "an"], "cannot write"),
    Row("analyze-no-sequences", lambda z, o: ["moe", "analyze", z.moe, "--data", z.data,
                                              "--val-fraction", "0", "--out", o],
        "no val sequences", fast=False),
    Row("analyze-unknown-domain", lambda z, o: ["moe", "analyze", z.moe, "--data", z.data,
                                                "--domains", "gamma", "--out", o], "gamma",
        fast=False),
    # ------------------------------------------------------------------ proxy generate
    Row("proxy-pair-count", lambda z, o: ["proxy", "generate", "--large", z.llama, "--tuned",
                                          f"{z.llama2},{z.llama2}", "--untuned", z.llama,
                                          "--prompt", "a"], "untuned base per tuned"),
    Row("proxy-alpha-count", lambda z, o: ["proxy", "generate", "--large", z.llama, "--tuned",
                                           z.llama2, "--untuned", z.llama, "--alpha", "1,2",
                                           "--prompt", "a"], "--alpha values"),
    Row("proxy-alpha-inf", lambda z, o: ["proxy", "generate", "--large", z.llama, "--tuned",
                                         z.llama2, "--untuned", z.llama, "--alpha", "inf",
                                         "--prompt", "a"], "finite"),
    Row("proxy-large-missing", lambda z, o: ["proxy", "generate", "--large", z.root / "no",
                                             "--tuned", z.llama2, "--untuned", z.llama,
                                             "--prompt", "a"], "not found"),
    Row("proxy-tuned-reward", lambda z, o: ["proxy", "generate", "--large", z.llama, "--tuned",
                                            z.rms[0], "--untuned", z.llama, "--prompt", "a"],
        "not a causal language model"),
    Row("proxy-tokenizers", lambda z, o: ["proxy", "generate", "--large", z.llama, "--tuned",
                                          z.other_tok, "--untuned", z.llama, "--prompt", "a"],
        "tokenizers of"),
    Row("proxy-prompt-and-prompts", lambda z, o: ["proxy", "generate", "--large", z.llama,
                                                  "--tuned", z.llama2, "--untuned", z.llama,
                                                  "--prompt", "a", "--prompts", z.empty],
        "exactly one of"),
    Row("proxy-no-prompt", lambda z, o: ["proxy", "generate", "--large", z.llama, "--tuned",
                                         z.llama2, "--untuned", z.llama], "exactly one of"),
    Row("proxy-prompts-empty", lambda z, o: ["proxy", "generate", "--large", z.llama,
                                             "--tuned", z.llama2, "--untuned", z.llama,
                                             "--prompts", z.empty], "no prompts"),
    Row("proxy-prompts-bad", lambda z, o: ["proxy", "generate", "--large", z.llama, "--tuned",
                                           z.llama2, "--untuned", z.llama, "--prompts",
                                           z.prompts_bad], "line 1"),
    Row("proxy-prompt-too-long", lambda z, o: ["proxy", "generate", "--large", z.llama,
                                               "--tuned", z.llama2, "--untuned", z.llama,
                                               "--prompt", z.long_prompt], "context window"),
    Row("proxy-out-exists", lambda z, o: ["proxy", "generate", "--large", z.llama, "--tuned",
                                          z.llama2, "--untuned", z.llama, "--prompt", "a",
                                          "--out", o.with_suffix(".jsonl")], "exists",
        exists=True),
    Row("proxy-out-folder", lambda z, o: ["proxy", "generate", "--large", z.llama, "--tuned",
                                          z.llama2, "--untuned", z.llama, "--prompt", "a",
                                          "--out", z.root], "is a folder"),
    Row("proxy-top-p", lambda z, o: ["proxy", "generate", "--large", z.llama, "--tuned",
                                     z.llama2, "--untuned", z.llama, "--prompt", "a", "--top-p",
                                     "0"], "(0, 1]"),
    Row("proxy-temperature", lambda z, o: ["proxy", "generate", "--large", z.llama, "--tuned",
                                           z.llama2, "--untuned", z.llama, "--prompt", "a",
                                           "--temperature", "-1"], "--temperature"),
    Row("proxy-format", lambda z, o: ["proxy", "generate", "--large", z.llama, "--tuned",
                                      z.llama2, "--untuned", z.llama, "--prompt", "a",
                                      "--large-format", "chatty"], "{prompt}"),
    Row("proxy-nan-large", lambda z, o: ["proxy", "generate", "--large", z.nan, "--tuned",
                                         z.llama2, "--untuned", z.llama, "--prompt", "a"],
        "contains NaN or Inf", fast=False),
    Row("proxy-chat-no-template", lambda z, o: ["proxy", "generate", "--large", z.llama,
                                                "--tuned", z.llama2, "--untuned", z.llama,
                                                "--prompt", "a", "--tuned-format", "chat"],
        "no chat template"),
    Row("proxy-device-absent", lambda z, o: ["proxy", "generate", "--large", z.llama,
                                             "--tuned", z.llama2, "--untuned", z.llama,
                                             "--prompt", "a", "--device", "cuda:3"],
        "device" if torch.cuda.device_count() > 3 else "no CUDA device"),
    Row("proxy-device-bad", lambda z, o: ["proxy", "generate", "--large", z.llama, "--tuned",
                                          z.llama2, "--untuned", z.llama, "--prompt", "a",
                                          "--device", "gpu"], "not a torch device"),
    Row("proxy-out-unwritable", lambda z, o: ["proxy", "generate", "--large", z.llama,
                                              "--tuned", z.llama2, "--untuned", z.llama,
                                              "--prompt", "a", "--out",
                                              z.text_file / "g.jsonl"], "cannot write"),
    # ------------------------------------------------------------------ proxy eval
    Row("proxyeval-nothing", lambda z, o: ["proxy", "eval", "--large", z.llama, "--tuned",
                                           z.llama2, "--untuned", z.llama, "--no-perplexity"],
        "nothing to evaluate"),
    Row("proxyeval-choices-bad", lambda z, o: ["proxy", "eval", "--large", z.llama, "--tuned",
                                               z.llama2, "--untuned", z.llama, "--choices",
                                               z.choices_bad, "--no-perplexity"], "line 1"),
    Row("proxyeval-seq-beyond", lambda z, o: ["proxy", "eval", "--large", z.llama, "--tuned",
                                              z.llama2, "--untuned", z.llama, "--seq-len",
                                              "4096"], "context window"),
    Row("proxyeval-tuned-large-tok", lambda z, o: ["proxy", "eval", "--large", z.llama,
                                                   "--tuned", z.llama2, "--untuned", z.llama,
                                                   "--tuned-large", z.other_tok, "--data",
                                                   z.data], "tokenizers of"),
    Row("proxyeval-unknown-domain", lambda z, o: ["proxy", "eval", "--large", z.llama,
                                                  "--tuned", z.llama2, "--untuned", z.llama,
                                                  "--data", z.data, "--domains", "gamma"],
        "gamma"),
    Row("proxy-speculative-zero", lambda z, o: ["proxy", "generate", "--large", z.llama,
                                                "--tuned", z.llama2, "--untuned", z.llama,
                                                "--prompt", "a", "--speculative", "0"],
        "greater than 0"),
    Row("proxy-speculative-beyond", lambda z, o: ["proxy", "generate", "--large", z.llama,
                                                  "--tuned", z.llama2, "--untuned", z.llama,
                                                  "--prompt", "a", "--speculative", "100000"],
        "context window"),
    # ------------------------------------------------------------------ serve
    Row("serve-large-missing", lambda z, o: ["serve", "--large", z.root / "no", "--port", "0"],
        "not found"),
    Row("serve-port-range", lambda z, o: ["serve", "--large", z.llama, "--port", "70000"],
        "`--port`"),
    Row("serve-pairs", lambda z, o: ["serve", "--large", z.llama, "--tuned", z.llama2,
                                     "--port", "0"], "1 --tuned model(s) but 0 --untuned"),
    Row("serve-no-draft", lambda z, o: ["serve", "--large", z.llama, "--port", "0",
                                        "--speculative", "2"], "needs a draft model"),
    Row("serve-draft-tokenizer", lambda z, o: ["serve", "--large", z.llama, "--port", "0",
                                               "--draft", z.other_tok, "--speculative", "2"],
        "tokenizers of"),
    # ------------------------------------------------------------------ reward data
    Row("rdata-out-exists", lambda z, o: ["reward", "data", "--data", z.data, "--out",
                                          o.with_suffix(".jsonl")], "exists", exists=True),
    Row("rdata-out-folder", lambda z, o: ["reward", "data", "--data", z.data, "--out", z.root],
        "is a folder"),
    Row("rdata-unknown-kind", lambda z, o: ["reward", "data", "--kinds", "swp", "--out", o],
        "did you mean `swap`"),
    Row("rdata-label-noise", lambda z, o: ["reward", "data", "--label-noise", "0.6", "--out",
                                           o], "[0, 0.5)"),
    Row("rdata-split", lambda z, o: ["reward", "data", "--split", "dev", "--out", o],
        "`train`, `test` or `all`"),
    Row("rdata-out-unwritable", lambda z, o: ["reward", "data", "--data", z.data, "--out",
                                              z.text_file / "p.jsonl"], "cannot write"),
    Row("rdata-missing-data", lambda z, o: ["reward", "data", "--data", z.root / "no", "--out",
                                            o], "not found"),
    # ------------------------------------------------------------------ reward train
    Row("rtrain-pairs-missing", lambda z, o: ["reward", "train", "--base-model", z.llama,
                                              "--pairs", z.root / "no.jsonl", "--out", o],
        "not found"),
    Row("rtrain-pairs-empty", lambda z, o: ["reward", "train", "--base-model", z.llama,
                                            "--pairs", z.empty, "--out", o], "no preference"),
    Row("rtrain-pairs-bad", lambda z, o: ["reward", "train", "--base-model", z.llama,
                                          "--pairs", z.pairs_bad, "--out", o],
        "line 2: missing field `chosen`"),
    Row("rtrain-base-reward", lambda z, o: ["reward", "train", "--base-model", z.pickle,
                                            "--pairs", z.pairs, "--out", o], "--allow-pickle"),
    Row("rtrain-baklava-count", lambda z, o: ["reward", "train", "--base-model",
                                              f"{z.llama},{z.llama2}", "--num-models", "3",
                                              "--pairs", z.pairs, "--out", o],
        "give one folder"),
    Row("rtrain-baklava-tokenizers", lambda z, o: ["reward", "train", "--base-model",
                                                   f"{z.llama},{z.other_tok}", "--num-models",
                                                   "2", "--pairs", z.pairs, "--out", o],
        "tokenizers of"),
    Row("rtrain-out-exists", lambda z, o: ["reward", "train", "--base-model", z.llama,
                                           "--pairs", z.pairs, "--out", o], "already exists",
        exists=True),
    Row("rtrain-lr-range", lambda z, o: ["reward", "train", "--base-model", z.llama, "--pairs",
                                         z.pairs, "--lr", "1e-3,1e-4", "--out", o],
        "LOW <= HIGH"),
    Row("rtrain-dropout", lambda z, o: ["reward", "train", "--base-model", z.llama, "--pairs",
                                        z.pairs, "--dropout", "1.5", "--out", o], "[0, 1)"),
    Row("rtrain-nan-base", lambda z, o: ["reward", "train", "--base-model", z.nan, "--pairs",
                                         z.pairs, "--out", o], "contains NaN or Inf",
        fast=False),
    Row("rtrain-seq-beyond", lambda z, o: ["reward", "train", "--base-model", z.llama,
                                           "--pairs", z.pairs, "--seq-len", "4096", "--out", o],
        "maximum of 256"),
    # ------------------------------------------------------------------ reward warm
    Row("warm-one-model", lambda z, o: ["reward", "warm", z.rms[0], "--out", o],
        "at least 2"),
    Row("warm-other-init", lambda z, o: ["reward", "warm", z.rms[0], z.rm_other, "--out", o],
        "different initialisations"),
    Row("warm-causal-lm", lambda z, o: ["reward", "warm", z.rms[0], z.llama, "--out", o],
        "not a reward model"),
    Row("warm-weights-count", lambda z, o: ["reward", "warm", z.rms[0], z.rms[1], "--weights",
                                            "1", "--out", o], "--weights"),
    Row("warm-negative-weights", lambda z, o: ["reward", "warm", z.rms[0], z.rms[1],
                                               "--weights", "1,-2", "--out", o],
        "non-negative"),
    Row("warm-nan", lambda z, o: ["reward", "warm", z.rms[0], z.rm_nan, "--out", o],
        "contains NaN or Inf", fast=False),
    Row("warm-out-exists", lambda z, o: ["reward", "warm", z.rms[0], z.rms[1], "--out", o],
        "already exists", exists=True),
    Row("warm-missing", lambda z, o: ["reward", "warm", z.rms[0], z.root / "no", "--out", o],
        "not found"),
    # ------------------------------------------------------------------ reward eval
    Row("reval-pairs-missing", lambda z, o: ["reward", "eval", z.rms[0], z.rms[1], "--pairs",
                                             z.root / "no.jsonl"], "not found"),
    Row("reval-policy-no-gold", lambda z, o: ["reward", "eval", z.rms[0], "--pairs", z.pairs,
                                              "--policy", z.llama], "both --policy and --gold"),
    Row("reval-policy-reward", lambda z, o: ["reward", "eval", z.rms[0], "--pairs", z.pairs,
                                             "--policy", z.rms[1], "--gold", z.rms[0]],
        "not a causal LM"),
    Row("reval-out-exists", lambda z, o: ["reward", "eval", z.rms[0], "--pairs", z.pairs,
                                          "--out", o.with_suffix(".json")], "exists",
        exists=True),
    Row("reval-out-folder", lambda z, o: ["reward", "eval", z.rms[0], "--pairs", z.pairs,
                                          "--out", z.root], "is a folder"),
    Row("reval-out-unwritable", lambda z, o: ["reward", "eval", z.rms[0], "--pairs", z.pairs,
                                              "--out", z.text_file / "r.json"], "cannot write"),
    Row("reval-causal-lm", lambda z, o: ["reward", "eval", z.llama, "--pairs", z.pairs],
        "not a reward model"),
    Row("reval-nan", lambda z, o: ["reward", "eval", z.rm_nan, "--pairs", z.pairs],
        "contains NaN or Inf", fast=False),
    # ------------------------------------------------------------------ demo
    Row("demo-unknown-stage", lambda z, o: ["demo", "--stages", "mergng", "--out", o],
        "did you mean `merging`"),
    Row("demo-out-unwritable", lambda z, o: ["demo", "--out", z.text_file / "demo"],
        "not a directory"),
    Row("demo-budget-zero", lambda z, o: ["demo", "--quick", "--budget-minutes", "0",
                                          "--out", o], "--budget-minutes"),
]


def _snapshot(p: Path):
    if p.is_dir():
        return sorted((q.relative_to(p), q.read_bytes()) for q in p.rglob("*") if q.is_file())
    return p.read_bytes() if p.exists() else None


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, zoo: Zoo, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    for k, v in (row.env or {}).items():
        monkeypatch.setenv(k, v)
    args = [str(a) for a in row.args(zoo, out)]
    target = next((Path(args[i + 1]) for i, a in enumerate(args[:-1]) if a == "--out"), out)
    if row.exists:  # something the user already has there
        if target.suffix:
            target.write_text("keep me\n")
        else:
            target.mkdir(parents=True)
            (target / "keep.txt").write_text("keep me\n")
    before = _snapshot(target)
    t0 = time.perf_counter()
    rc, stdout, err = run_cli(capsys, *args)
    dt = time.perf_counter() - t0
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert rc == 2, (rc, stdout, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("lmalloy: error:"), err
    assert row.match.lower() in lines[0].lower(), lines[0]
    if row.exists:
        assert _snapshot(target) == before, "the existing output was changed"
    elif target.parent.exists() and target.is_relative_to(tmp_path):
        assert not target.exists(), f"{target} was written"
    leftovers = [p.name for p in target.parent.iterdir() if ".tmp-" in p.name] \
        if target.parent.is_dir() else []
    assert not leftovers, leftovers
    if row.fast:
        assert dt < FAST_S, f"{dt:.2f} s to refuse a mistake a config or header reveals"


def test_the_suite_covers_every_command():
    from lmalloy.cli import COMMANDS

    covered = {r.id.split("-")[0] for r in ROWS}
    prefix = {"data list": "data", "tokenizer": "tokenizer", "pretrain": "pretrain",
              "finetune": "finetune", "eval": "eval", "inspect": "inspect",
              "average": "average", "merge": "merge", "merge lorahub": "lorahub",
              "merge search": "search",
              "merge extract-lora": "extract", "moe build": "moe", "moe analyze": "analyze",
              "proxy generate": "proxy", "proxy eval": "proxyeval", "reward data": "rdata",
              "reward train": "rtrain", "reward warm": "warm", "reward eval": "reval",
              "demo": "demo", "serve": "serve"}
    assert set(COMMANDS) <= set(prefix), set(COMMANDS) - set(prefix)
    missing = [c for c, p in prefix.items() if p not in covered]
    assert not missing, missing
    assert len(ROWS) >= 150, len(ROWS)
