"""Shared test helpers: tiny HF models and tokenizers built in-process, CLI runner."""

from __future__ import annotations

import shutil
from pathlib import Path

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import json\nprint(json.dumps({'a': 1, 'b': [1, 2, 3]}))\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
] * 20


def make_tokenizer(path: Path, vocab_size: int = 320) -> Path:
    from lmalloy.data.tokenizer import train_tokenizer

    train_tokenizer(TEXTS, vocab_size, path, min_frequency=1)
    return path


def make_llama(path: Path, tokenizer: Path | None = None, seed: int = 0, hidden: int = 32,
               layers: int = 2, vocab: int = 320, dtype: str = "float32", heads: int = 4,
               kv_heads: int = 2, intermediate: int = 64, noise_from: Path | None = None,
               noise: float = 0.0, tie: bool = False) -> Path:
    """A tiny LlamaForCausalLM saved as an HF folder (optionally a perturbed copy of another)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0,
                      pad_token_id=1)
    model = LlamaForCausalLM(cfg)
    if noise_from is not None:
        base = LlamaForCausalLM.from_pretrained(noise_from, dtype=torch.float32)
        with torch.no_grad():
            for (_, p), (_, q) in zip(model.named_parameters(), base.named_parameters(),
                                      strict=True):
                p.copy_(q + noise * torch.randn_like(q))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(path)
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            shutil.copyfile(f, path / f.name)
    return path



def make_finetunes(d: Path, tokenizer: Path, n: int, noise: float = 0.02) -> tuple:
    """(base, [n fine-tunes]): a tiny Llama and n perturbed copies of it, in folder `d`."""
    base = make_llama(d / "base", tokenizer, seed=0)
    return base, [make_llama(d / f"ft{i}", tokenizer, seed=i + 1, noise_from=base, noise=noise)
                  for i in range(n)]

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
           "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]


def make_adapter(path: Path, base: Path, r: int, alpha: float, seed: int,
                 modules=MODULES) -> Path:
    import json

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    state = {}
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        for m in modules:
            out, inp = f.get_slice(f"{m}.weight").get_shape()
            state[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, inp, generator=g) * .1
            state[f"base_model.model.{m}.lora_B.weight"] = torch.randn(out, r, generator=g) * .1
    save_file(state, path / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "base_model_name_or_path": str(base), "r": r,
           "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0,
           "fan_in_fan_out": False, "bias": "none", "task_type": "CAUSAL_LM"}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


# a tiny pretraining run that takes seconds (the training tests build on it)
FAST = ["--preset", "tiny", "--domains", "json", "--seq-len", "32", "--global-batch-tokens",
        "256", "--micro-batch-size", "4", "--lr", "3e-3", "--eval-tokens", "2048",
        "--no-progress", "--threads", "1", "--log-every", "1"]


def pretrain_args(out: Path, tok: Path, *extra: str) -> list[str]:
    return ["pretrain", *FAST, "--tokenizer", str(tok), "--out", str(out), *extra]


def weights(folder: Path) -> dict:
    """{name: tensor} of an HF folder's single model.safetensors."""
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `lmalloy ARGS` in-process; returns (exit code, stdout, stderr)."""
    from lmalloy.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse --help
        rc = int(e.code or 0)
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_user_error(capsys, *args: str, match: str) -> str:
    """The command fails with exit code 2 and a one-line error containing `match`."""
    rc, out, err = run_cli(capsys, *args)
    assert rc == 2, (rc, out, err)
    lines = [x for x in err.strip().splitlines() if x.startswith("lmalloy: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert match.lower() in lines[0].lower(), lines[0]
    return lines[0]


# tiny random configs of the families users bring (transformers' own config classes);
# vocabulary rows padded past the 320-token test tokenizer, as real checkpoints pad them
SMALL = dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             bos_token_id=0, eos_token_id=0, pad_token_id=1)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 8, "tie_word_embeddings": True}),
    "gemma2": ("Gemma2Config", {"head_dim": 8, "query_pre_attn_scalar": 8,
                                "sliding_window": 64}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 8, "query_pre_attn_scalar": 8,
                                         "sliding_window": 64}),
    "phi3": ("Phi3Config", {"tie_word_embeddings": False}),
    "olmo2": ("Olmo2Config", {}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 32,
                                     "decoder_sparse_step": 1}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "head_dim": 8,
                                     "decoder_sparse_step": 1}),
    "olmoe": ("OlmoeConfig", {"num_experts": 4, "num_experts_per_tok": 2}),
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def make_family(path: Path, family: str, tokenizer: Path | None = None, seed: int = 0,
                noise_from: Path | None = None, noise: float = 0.0) -> Path:
    """A tiny random model of `family` saved as an HF folder (with the tokenizer's files)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**SMALL, **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if noise_from is not None:
        base = AutoModelForCausalLM.from_pretrained(noise_from, dtype=torch.float32)
        with torch.no_grad():
            for (_, p), (_, q) in zip(model.named_parameters(), base.named_parameters(),
                                      strict=True):
                p.copy_(q + noise * torch.randn_like(q))
    model.save_pretrained(path)
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            shutil.copyfile(f, path / f.name)
    return path
