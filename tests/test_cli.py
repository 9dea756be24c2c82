import subprocess
import sys

from hf_gradext import cli
from hf_gradext.errors import UserFacingError


def test_usage_lists_train(capsys):
    assert cli.main([]) == 2
    assert "train" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0


def test_unknown_command(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_user_facing_errors_are_caught_centrally(monkeypatch, capsys):
    import types

    def boom(argv):
        raise UserFacingError("--thing is wrong; fix it")

    monkeypatch.setitem(sys.modules, "fake_sub", types.SimpleNamespace(main=boom))
    assert cli.run_entry("fake_sub:main", []) == 2
    assert capsys.readouterr().err.strip() == "error: --thing is wrong; fix it"


def test_train_dispatch_in_process(capsys):
    assert cli.main(["train", "--no_such_flag"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown flag --no_such_flag")


def test_console_script_help():
    # `hf-gradext train --help` goes through argparse's help: exit 0, lists our flags.
    proc = subprocess.run(
        [sys.executable, "-m", "hf_gradext.cli", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--model_name_or_path" in proc.stdout and "--config RUN.yaml" in proc.stdout


def test_version(capsys):
    from hf_gradext import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hf-gradext {__version__}"


TEXT_ONLY_PROCESS = """
import sys
sys.argv = ["/some/venv/bin/hf-gradext", *{args!r}]
from hf_gradext.cli import main
code = main(sys.argv[1:])
print("HEAVY" if {{"torch", "transformers"}} & set(sys.modules) else "LIGHT", code)
"""


def test_help_and_version_import_neither_torch_nor_transformers():
    """What makes `hf-gradext --help` answer in ~0.1 s (timed by recipes/benchmarks/bench_cli_startup.py)."""
    for args, code in (([], 2), (["--help"], 0), (["--version"], 0), (["-V"], 0)):
        proc = subprocess.run(
            [sys.executable, "-c", TEXT_ONLY_PROCESS.format(args=args)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.stdout.split()[-2:] == ["LIGHT", str(code)], (args, proc.stdout, proc.stderr[-2000:])


def test_any_other_process_registers_the_patched_model_type():
    script = TEXT_ONLY_PROCESS.format(args=["train", "--no_such_flag"]) + (
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "print('gpt2_gradext' in CONFIG_MAPPING)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split()[-3:] == ["HEAVY", "2", "True"], (proc.stdout, proc.stderr[-2000:])


def test_train_help_is_grouped_by_feature_with_config_first():
    from hf_gradext.arguments.parsing import build_parser

    text = build_parser().format_help()
    titles = [
        line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")
    ]
    assert titles == [
        "run config",
        "model and data",
        "gradient quality control (GQC)",
        "per-sample gradient collection",
        "gradient projection",
        "GPT-2 patches",
        "HF TrainingArguments (see transformers' docs)",
    ]
    sections = dict(zip(titles, text.split("\n\n")[1:], strict=False))
    assert "--config RUN.yaml" in sections["run config"]
    assert "--gqc " in sections["gradient quality control (GQC)"]
    assert "--proj_rank_total" in sections["gradient projection"]
    assert "--learning_rate" in text.split("HF TrainingArguments")[1]
    assert text.splitlines()[0].startswith("usage: hf-gradext train [--config RUN.yaml]")
