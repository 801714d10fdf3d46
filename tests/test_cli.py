"""The entry point: light imports, one-line errors, config/flag merging."""

from __future__ import annotations

import subprocess
import sys

from common import assert_user_error, run_cli


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from lmalloy.cli import main; main(['--help']); "
            "print('HEAVY', 'transformers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "pretrain" in out
    assert "HEAVY False False" in out


def test_subcommand_help_lists_flags_without_heavy_imports():
    code = ("import sys; from lmalloy.cli import main\n"
            "try: main(['pretrain', '--help'])\nexcept SystemExit: pass\n"
            "print('HEAVY', 'transformers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "--global-batch-tokens" in out and "--seq-len" in out
    assert "HEAVY False False" in out


def test_unknown_command_suggests(capsys):
    assert_user_error(capsys, "pretrian", match="did you mean `pretrain`")


def test_unknown_preset_suggests(capsys, tmp_path):
    assert_user_error(capsys, "pretrain", "--preset", "smal", "--out", tmp_path / "o",
                      match="did you mean `small`")
    assert not (tmp_path / "o").exists()


def test_unknown_yaml_key_suggests(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("preset: tiny\nseq_lenn: 64\n")
    assert_user_error(capsys, "pretrain", "--config", cfg, match="did you mean `seq_len`")


def test_unknown_flag_is_one_line(capsys):
    assert_user_error(capsys, "pretrain", "--no-such-flag", "1", match="unrecognized")


def test_bad_value_names_the_flag(capsys, tmp_path):
    line = assert_user_error(capsys, "pretrain", "--lr", "-1", "--out", tmp_path / "o",
                             match="--lr")
    assert "-1" in line


def test_flags_override_yaml_and_kebab_keys(tmp_path):
    from lmalloy.cli import parse

    cfg = tmp_path / "run.yaml"
    cfg.write_text("preset: tiny\nseq-len: 64\nlr: 0.01\ndomains: [json, email]\n")
    c = parse("pretrain", ["--config", str(cfg), "--lr", "0.002", "--domains", "json"])
    assert c.preset == "tiny" and c.seq_len == 64 and c.lr == 0.002 and c.domains == ["json"]


def test_debug_shows_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmalloy", "pretrain", "--preset", "nope",
                        "--out", str(tmp_path / "o"), "--debug"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_version(capsys):
    rc, out, _ = run_cli(capsys, "--version")
    assert rc == 0 and out.startswith("lmalloy ")
