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
