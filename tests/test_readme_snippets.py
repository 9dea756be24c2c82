"""Every code block of the README runs as written, on tiny settings, from a fresh working directory.

Blocks are found by their fence language (``python``, ``bash``) and named by their first line that is
not an import (:func:`block_key`). Each one
has an entry in ``SNIPPETS`` saying what a reader has before running it (``./my-gpt2``, ``train.txt``,
``val.txt``, a ``model``/``batch`` for the Python API blocks) and how it is shrunk: the only changes are
smaller step counts, never a different flag set or path. A README block without an entry fails the test,
so a new example cannot go in untested. ``hf-gradext`` commands run in-process (``cli.main``), each
exiting 0; Python blocks run with ``exec`` in the same working directory.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass, field

import pytest
import torch

from hf_gradext import cli
from hf_gradext.data.corpus import embedded_documents
from tests.helpers import REPO_ROOT

README = REPO_ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


@dataclass
class Snippet:
    """How one README block runs: ``skip`` (why it cannot run here), argv edits, a Python prelude."""

    skip: str | None = None
    subs: dict[str, str] = field(default_factory=dict)  # text replacements (step counts only)
    setup: list[str] = field(default_factory=list)  # hf-gradext commands run first (not in the README)
    prelude: str = ""  # Python run before a python block (what the text says the reader has)
    after: str = ""  # Python checks run after it


TINY_MODEL_PRELUDE = """
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("my-gpt2")
tok = AutoTokenizer.from_pretrained("my-gpt2")
enc = tok(["Once upon a time there was a fox.", "The cat sat on the mat and slept."], return_tensors="pt",
          padding="max_length", max_length=16, truncation=True)
batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": enc["input_ids"].clone()}
batch["labels"][enc["attention_mask"] == 0] = -100
batch_a = batch_b = batch
"""

SNIPPETS: dict[str, Snippet] = {
    "make demo   # installs CPU torch 2.13.0 + hf_gradext (the locked set), trains a tiny GPT-2 on the embedded corpus": Snippet(
        skip="CI runs `make test` itself; `make demo` is `hf-gradext train` with no arguments (test_train)"
    ),
    "# Fine-tune a model (a Hub id, or a local directory written by save_pretrained) on local text files": Snippet(
        subs={
            "--num_train_epochs 1": "--num_train_epochs 1 --max_steps 2",
            "--config recipes/gpt2_small_tinystories.yaml": "SKIP",
            "--learning_rate 1e-3 --output_dir out2": "--learning_rate 1e-3 --output_dir out2 --max_steps 2",
            "--resume_from_checkpoint latest": "--resume_from_checkpoint latest --max_steps 3",
            "--early_stopping_patience 3": "--early_stopping_patience 3 --max_steps 2",
        },
        setup=["train --output_dir outputs/tiny-default --max_steps 2 --save_strategy steps --save_steps 2"],
    ),
    'args = parse_args(["--output_dir", "out-python", "--max_steps", "50"])  # or GradExtArguments(...)': Snippet(
        subs={'"--max_steps", "50"': '"--max_steps", "2"'},
        after="assert metrics['eval_loss'] > 0 and 0 <= metrics['eval_accuracy'] <= 1",
    ),
    "hf-gradext train --config recipes/gqc_tiny.yaml          # gnts, relative threshold, embedded default": Snippet(
        subs={"recipes/gqc_tiny.yaml": "recipes/gqc_tiny.yaml --max_steps 3"}
    ),
    '# model: any causal LM; ds: a dataset of input_ids/labels blocks (as in "Python" above)': Snippet(
        prelude=TINY_MODEL_PRELUDE
        + """
from hf_gradext.data import build_datasets, load_tokenizer
from hf_gradext.arguments.parsing import parse_args
_args = parse_args(["--output_dir", "unused", "--model_name_or_path", "my-gpt2", "--train_file", "train.txt",
                    "--block_size", "32"])
ds, _ = build_datasets(_args, tok, block_size=32)
""",
        subs={"logging_steps=1)": "logging_steps=1, max_steps=2, report_to=[], use_cpu=True)"},
        after="assert 'gqc/microbatches' in trainer.state.log_history[0]",
    ),
    'grads = per_sample_gradients(model, batch, layers="all", dtype=torch.float32)  # {param name: (B, *shape)}': Snippet(
        prelude=TINY_MODEL_PRELUDE, after="assert norms.shape == (2,) and sim.shape == (2, 2)"
    ),
    "hf-gradext train --max_steps 200 --collect_gradients --gradient_collection_steps 10 \\": Snippet(
        subs={
            "--max_steps 200": "--max_steps 2",
            "--gradient_collection_steps 10": "--gradient_collection_steps 1",
        }
    ),
    'proj = KroneckerProjector(model, layers="mlp,attn", rank_total=256, rank_min=8, seed=42)': Snippet(
        prelude=TINY_MODEL_PRELUDE,
        setup=[
            "project --model_name_or_path my-gpt2 --train_file train.txt --block_size 64 --batch_size 8 "
            "--max_samples 8 --output_dir runs/proj"
        ],
        after="assert rows.shape[0] == len(ids) == 8",
    ),
    '# ./my-gpt2, train.txt, val.txt as in "Training" above; every command writes its own folder under runs/': Snippet(
        subs={
            "--max_steps 20": "--max_steps 2",
            "--batch_size 8 \\": "--batch_size 8 --max_samples 16 \\",
            "--max_samples 32": "--max_samples 4",
        }
    ),
    "apply_gradext_to_gpt2(rms_norm=True, swiglu=True, model=model)  # an existing model, in place": Snippet(
        prelude="from tests.helpers import make_tiny_gpt2\nmodel = make_tiny_gpt2()\n",
        after=(
            "assert type(model).__name__ == 'GradExtGPT2LMHeadModel'\n"
            "from hf_gradext.patches import gpt2_models, mask_cache\n"
            "gpt2_models.uninstall_class_level_patches(); mask_cache.uninstall_mask_cache()\n"
        ),
    ),
    '# model: a causal LM, tokenizer: its tokenizer, train: a datasets.Dataset with a "text" column': Snippet(
        prelude=TINY_MODEL_PRELUDE
        + """
import datasets
tokenizer = tok
train = datasets.Dataset.from_dict({"text": open("train.txt").read().split("\\n\\n")[:8]})
""",
        subs={"packing=False)": "packing=False, max_steps=2, report_to=[], use_cpu=True, max_length=32)"},
    ),
}


def block_key(code: str) -> str:
    """A block's name: its first line that is neither blank nor an import (imports repeat across blocks)."""
    lines = [line for line in code.splitlines() if line.strip()]
    return next((line for line in lines if not line.startswith(("import ", "from "))), lines[0])


def readme_blocks() -> list[tuple[str, str, str]]:
    """``(key, language, code)`` of every python/bash block of the README."""
    return [
        (block_key(code), lang, code)
        for lang, code in FENCE.findall(README.read_text())
        if lang in ("python", "bash")
    ]


def _commands(code: str) -> list[list[str]]:
    """The ``hf-gradext`` commands of a bash block (continuation lines joined, comments dropped)."""
    joined = code.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        tokens = shlex.split(line, comments=True)
        if tokens and tokens[0] == "hf-gradext":
            commands.append(tokens[1:])
    return commands


def _apply(code: str, subs: dict[str, str]) -> str:
    for old, new in subs.items():
        assert old in code, f"substitution {old!r} no longer matches the README block"
        code = code.replace(old, new)
    return code


@pytest.fixture
def reader_dir(tmp_path, saved_model_dir, monkeypatch):
    """A fresh working directory with what the README says a reader has: ./my-gpt2, train.txt, val.txt,
    and the repository's recipes/."""
    shutil.copytree(saved_model_dir, tmp_path / "my-gpt2")
    docs = embedded_documents()
    (tmp_path / "train.txt").write_text("\n\n".join(docs[:200]))
    (tmp_path / "val.txt").write_text("\n\n".join(docs[200:240]))
    shutil.copytree(
        REPO_ROOT / "recipes", tmp_path / "recipes", ignore=shutil.ignore_patterns("*.csv", "*.png")
    )
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    return tmp_path


def _run_cli(argv: list[str]) -> None:
    code = cli.main(argv)
    assert code == 0, f"hf-gradext {shlex.join(argv)} exited {code}"


def test_every_readme_block_has_an_entry():
    missing = [first for first, _, _ in readme_blocks() if first not in SNIPPETS]
    assert not missing, f"README blocks without an entry in SNIPPETS (add one saying how they run): {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("first", [first for first, _, _ in readme_blocks()], ids=lambda s: s[:40])
def test_readme_block_runs_as_written(first, reader_dir):
    spec = SNIPPETS[first]
    if spec.skip:
        pytest.skip(spec.skip)
    lang, code = next((lang, code) for f, lang, code in readme_blocks() if f == first)
    for argv in spec.setup:
        _run_cli(shlex.split(argv))
    code = _apply(code, spec.subs)
    if lang == "bash":
        commands = [argv for argv in _commands(code) if "SKIP" not in argv]
        assert commands, "a bash block without hf-gradext commands"
        for argv in commands:
            _run_cli(argv)
        return
    namespace: dict = {}
    exec(compile(spec.prelude + code + "\n" + spec.after, f"README:{first[:30]}", "exec"), namespace)


def test_error_example_is_the_real_message(reader_dir, capsys):
    """The README's sample error line is what the command prints."""
    text = README.read_text()
    shown = re.search(r"^\$ hf-gradext (train --block_size 4096)\n(error: .*)$", text, re.M)
    assert shown, "the README's error example moved; update this test"
    assert cli.main(shlex.split(shown.group(1))) == 2
    assert capsys.readouterr().err.strip() == shown.group(2)
