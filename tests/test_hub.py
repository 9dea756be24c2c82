"""hf_gradext.hub: missing local folders, an unreachable Hub, offline mode; fast one-line errors.

The Hub is made unreachable deterministically with ``HF_ENDPOINT`` pointing at a 127.0.0.1 port that
refuses connections (or accepts them and never answers); the offline switches that conftest sets for
the suite are removed in those subprocesses, as on a user's machine without network.
"""

from __future__ import annotations

import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor

import pytest

from hf_gradext import hub
from hf_gradext.errors import UserFacingError
from tests.helpers import (
    QUICK_TRAIN_FLAGS,
    REPO_ROOT,
    UnreachablePort,
    hub_env,
    write_hub_cache,
)

TIME_LIMIT_S = 20.0  # the requirement; a limit, not a benchmark (a fresh process imports for ~7 s)
# On a loaded machine the imports alone can take longer; the Hub retries this guards against add
# >= 23 s of sleeping per file, so "within SLACK_S of a run that fails right after the imports" holds too.
SLACK_S = 10.0
MAX_LINES = 5


@pytest.fixture
def online(monkeypatch):
    """In this process: huggingface_hub not offline, probes forgotten before and after the test."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_probes", {})
    monkeypatch.setattr(hub, "_warned", set())
    return constants


# --- naming: local folder or Hub id ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "openai-community/gpt2", "org/model.v1", "a", "a_b/c-d"])
def test_hub_ids(name):
    assert hub.is_hub_id(name)


@pytest.mark.parametrize(
    "name", ["./nonexistent", "/tmp/nope", "~/models/x", "a/b/c", ".hidden", "-x", "a--b", "a..b", "x/"]
)
def test_path_like_names_that_do_not_exist_are_missing_local_folders(name):
    with pytest.raises(UserFacingError) as info:
        hub.check_source("--model_name_or_path", name)
    msg = str(info.value)
    assert "no such local directory" in msg and "Hub" not in msg.split(";")[0] and "\n" not in msg


def test_existing_directory_is_local_and_a_file_is_named_as_such(tmp_path):
    assert hub.check_source("--tokenizer_name", str(tmp_path)) == "local"
    (tmp_path / "model.bin").write_text("x")
    with pytest.raises(UserFacingError, match="is a file, not a directory"):
        hub.check_source("--model_name_or_path", str(tmp_path / "model.bin"))
    assert hub.check_source("--model_name_or_path", "some-org/model") == "hub"


# --- the probe ---------------------------------------------------------------------------------------


def test_offline_mode_never_probes(monkeypatch):
    # conftest runs the suite with HF_HUB_OFFLINE=1
    monkeypatch.setattr(hub, "_probe", lambda *a: pytest.fail("probed in offline mode"))
    assert hub.hub_status().state == "offline"


def test_refused_connection_is_unreachable_and_probed_once(online, monkeypatch):
    with UnreachablePort() as port:
        monkeypatch.setattr(online, "ENDPOINT", port.url)
        start = time.monotonic()
        status = hub.hub_status()
        assert time.monotonic() - start < 5
        assert status.state == "unreachable" and status.endpoint == port.url and status.detail
        monkeypatch.setattr(hub, "_probe", lambda *a: pytest.fail("probed twice"))
        assert hub.hub_status() is status


def test_silent_endpoint_is_unreachable_within_the_probe_timeout(online, monkeypatch):
    monkeypatch.setenv(hub.PROBE_TIMEOUT_ENV, "0.5")
    with UnreachablePort(silent=True) as port:
        monkeypatch.setattr(online, "ENDPOINT", port.url)
        start = time.monotonic()
        status = hub.hub_status()
        assert time.monotonic() - start < 3
    assert status.state == "unreachable"


def test_probe_timeout_zero_skips_the_probe(online, monkeypatch):
    monkeypatch.setenv(hub.PROBE_TIMEOUT_ENV, "0")
    monkeypatch.setattr(hub, "_probe", lambda *a: pytest.fail("probed with timeout 0"))
    assert hub.hub_status().state == "reachable"


# --- loading under each state ------------------------------------------------------------------------


def _unreachable(monkeypatch):
    status = hub.HubStatus("unreachable", "http://127.0.0.1:1", "ConnectError: refused")
    monkeypatch.setattr(hub, "hub_status", lambda datasets=False: status)
    monkeypatch.setattr(hub, "_warned", set())
    return status


def test_unreachable_hub_loads_from_the_cache_only(monkeypatch, caplog):
    _unreachable(monkeypatch)
    seen = {}

    def loader(name, **kwargs):
        seen.update(kwargs)
        return "loaded"

    with caplog.at_level("WARNING", logger="hf_gradext.hub"):
        out = hub.load_pretrained(loader, "org/m", flag="--model_name_or_path", what="model", cache_dir=None)
    assert out == "loaded" and seen["local_files_only"] is True
    assert "HF_HUB_OFFLINE=1" in caplog.text and "'org/m'" in caplog.text


def test_unreachable_hub_and_not_cached_says_how_to_proceed(monkeypatch):
    _unreachable(monkeypatch)

    def loader(name, **kwargs):
        raise OSError("couldn't find them in the cached files")

    with pytest.raises(UserFacingError) as info:
        hub.load_pretrained(loader, "org/m", flag="--tokenizer_name", what="tokenizer", cache_dir="/c")
    msg = str(info.value)
    assert "\n" not in msg and "--tokenizer_name 'org/m'" in msg and "unreachable" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "local directory" in msg and "(/c)" in msg


def test_offline_and_not_cached_says_so():
    def loader(name, **kwargs):
        raise OSError("offline")

    with pytest.raises(UserFacingError) as info:
        hub.load_pretrained(loader, "org/m", flag="--config_name", what="config", cache_dir=None)
    msg = str(info.value)
    assert "not in the local cache" in msg and "HF_HUB_OFFLINE=1" in msg and "local directory" in msg


def test_unreachable_hub_dataset_fails_before_load_dataset(monkeypatch):
    _unreachable(monkeypatch)
    with pytest.raises(UserFacingError) as info:
        hub.check_dataset_source("org/data")
    msg = str(info.value)
    assert "unreachable" in msg and "HF_HUB_OFFLINE=1" in msg and "--train_file" in msg


def test_check_sources_names_the_flag_of_a_missing_folder(tmp_path):
    args = types.SimpleNamespace(
        model_name_or_path=None, config_name="tiny", tokenizer_name=str(tmp_path / "gone"), dataset_name=None
    )
    with pytest.raises(UserFacingError, match="^--tokenizer_name .*no such local directory"):
        hub.check_sources(args)
    args.tokenizer_name = None
    hub.check_sources(args)  # the built-in config size is no folder and no Hub id


# --- the CLI, as a user without network runs it ------------------------------------------------------


def _cli(argv, env, tmp_path):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "hf_gradext.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=120,
    )
    return proc, time.monotonic() - start


CLI_CASES = {
    # case: (flags, what the last line must contain)
    "model": (["--model_name_or_path", "some-org/unreachable-model"], ["unreachable", "HF_HUB_OFFLINE=1"]),
    "tokenizer": (["--tokenizer_name", "some-org/unreachable-tok"], ["unreachable", "HF_HUB_OFFLINE=1"]),
    "dataset": (["--dataset_name", "some-org/unreachable-ds"], ["unreachable", "HF_HUB_OFFLINE=1"]),
    "relative_path": (["--model_name_or_path", "./nonexistent"], ["no such local directory"]),
    "absolute_path": (["--model_name_or_path", "/tmp/nope-hf-gradext"], ["no such local directory"]),
    "offline_uncached": (["--model_name_or_path", "some-org/uncached"], ["not in the local cache"]),
    "silent_hub": (["--model_name_or_path", "some-org/unreachable-model"], ["unreachable"]),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Every case as its own ``hf-gradext train`` process, two at a time (the machines have 2 cores)."""
    tmp = tmp_path_factory.mktemp("hub_cli")
    with UnreachablePort() as refused, UnreachablePort(silent=True) as silent:

        def run(case):
            flags, _ = CLI_CASES[case]
            env = hub_env(refused.url, HF_HOME=str(tmp / "hf_home"))
            if case == "offline_uncached":
                env = hub_env(refused.url, offline=True, HF_HOME=str(tmp / "hf_home"))
            if case == "silent_hub":
                env = hub_env(silent.url, HF_HOME=str(tmp / "hf_home"), **{hub.PROBE_TIMEOUT_ENV: "2"})
            argv = ["train", *flags, "--output_dir", str(tmp / f"out_{case}")]
            return case, _cli(argv, env, tmp)

        def baseline(_):
            (tmp / "a_file").write_text("x")  # --output_dir is a file: fails right after the imports
            return _cli(["train", "--output_dir", str(tmp / "a_file")], hub_env(refused.url), tmp)[1]

        with ThreadPoolExecutor(max_workers=2) as pool:
            runs = dict(pool.map(run, CLI_CASES))
            fastest = min(pool.map(baseline, range(2)))
    return tmp, runs, fastest


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_fails_fast_in_few_lines_with_the_way_out(cli_runs, case):
    tmp, runs, baseline = cli_runs
    proc, elapsed = runs[case]
    output = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2, output[-20:]
    assert len(output) <= MAX_LINES, output
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in proc.stderr
    for text in CLI_CASES[case][1]:
        assert text in last, last
    if "path" in case:
        assert "Hub (" not in last and "unreachable" not in last
    else:  # the way out besides the cache: a local model directory, or local data files
        assert "local directory" in last or "local files" in last
    assert elapsed < TIME_LIMIT_S or elapsed - baseline < SLACK_S, (
        f"{elapsed:.1f} s (baseline {baseline:.1f} s)"
    )
    assert not (tmp / f"out_{case}").exists()


# --- a model that IS cached still trains, offline or with the Hub unreachable ------------------------


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, saved_model_dir):
    """An HF_HOME whose Hub cache holds 'some-org/cached-tiny' (the suite's saved tiny GPT-2 + tokenizer)."""
    home = tmp_path_factory.mktemp("hf_home")
    write_hub_cache(home / "hub", "some-org/cached-tiny", saved_model_dir)
    return home


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["offline", "unreachable"])
def test_cached_hub_model_trains_without_the_hub(hub_cache, tmp_path, mode):
    out = tmp_path / "out"
    argv = [
        "train", "--model_name_or_path", "some-org/cached-tiny", "--output_dir", str(out),
        *QUICK_TRAIN_FLAGS, "--max_steps", "1", "--block_size", "32", "--log_level", "warning",
    ]  # fmt: skip
    with UnreachablePort() as port:
        env = hub_env(port.url, offline=mode == "offline", HF_HOME=str(hub_cache))
        proc, _ = _cli(argv, env, REPO_ROOT)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert (out / "model.safetensors").is_file()
    if mode == "unreachable":
        assert "using the cached 'some-org/cached-tiny'" in proc.stdout + proc.stderr


_LOG_ONCE = """
import logging, types
from hf_gradext.train import _setup_logging
args = types.SimpleNamespace(get_process_log_level=lambda: logging.WARNING, log_level="warning", should_log=True)
_setup_logging(args)
for name in ("huggingface_hub.utils._http", "datasets.load", "transformers.modeling_utils", "hf_gradext.hub"):
    logging.getLogger(name).warning("retry-line from %s", name)
"""


def test_train_logging_prints_each_library_warning_once(tmp_path):
    # huggingface_hub and datasets own a stderr handler and propagated to the root handler too: twice.
    proc = subprocess.run(
        [sys.executable, "-c", _LOG_ONCE], capture_output=True, text=True, cwd=str(REPO_ROOT), timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "retry-line" in line]
    for name in (
        "huggingface_hub.utils._http",
        "datasets.load",
        "transformers.modeling_utils",
        "hf_gradext.hub",
    ):
        assert sum(name in line for line in lines) == 1, lines
