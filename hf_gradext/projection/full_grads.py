"""``hf-gradext full-grads``: exact per-sample gradients (the reference for projection error analysis).

Output directory: ``fullgrad_meta.json`` (``param_slices``: per parameter name its ``start``, ``end``
and ``shape`` inside the flattened vector; ``total_param_dim``; layers; dtype) and shards
``fullgrad-rank000-*.safetensors`` with tensor ``grad`` (n, total_param_dim) and index rows
``example_id``. Tied weights appear once (``transformer.wte.weight`` = embedding + ``lm_head``).

``proj_precondition`` (and ``proj_precondition_power``) on the run arguments stores the Adam-preconditioned
gradients ``s ** power * G`` with the exact elementwise scale (:meth:`AdamPreconditioner.apply`), the
reference for the folded (rank1 / adafactor) projections; recorded as ``preconditioning`` in
``fullgrad_meta.json`` and in the run settings (a resume with another state is refused).

Output directory (the policy of :mod:`hf_gradext.store.policy`): a directory holding gradient shards is
refused, before the model is loaded, unless ``--overwrite`` (its shards and ``fullgrad_meta.json`` are
removed, logged) or ``--resume`` (examples already stored are skipped; refused unless the model's weights
fingerprint and the row settings -- stored parameters, dtype, data, split -- are those of the run that
wrote it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hf_gradext.errors import UserFacingError
from hf_gradext.projection.io import write_json_atomic
from hf_gradext.store.integrity import damaged, read_json
from hf_gradext.store.policy import (
    OutputDir,
    RunFingerprint,
    choose_mode,
    model_fingerprint,
    prepare_output_dir,
    refuse_fresh_into_rows,
)

PREFIX = "fullgrad"
META_FILE = "fullgrad_meta.json"
WRITER = "full_grads"  # the writer named in the directory's run fingerprint
FLAGS = ("--output_dir", "--overwrite", "--resume")  # the directory, overwrite and resume flags


def full_grads_output(directory: str | Path) -> OutputDir:
    """A ``full-grads`` directory under the output-directory policy."""
    return OutputDir(Path(directory), PREFIX, *FLAGS, side_files=(META_FILE,))


def run_full_grads(margs: Any, fargs: Any) -> dict[str, Any]:
    from hf_gradext.grad import per_sample_gradients
    from hf_gradext.projection.dataset_pass import (
        ProjectRunArguments,
        data_settings,
        load_data_for_pass,
        load_model_for_pass,
    )
    from hf_gradext.projection.io import completed_example_ids
    from hf_gradext.projection.preconditioning import preconditioner_from_args
    from hf_gradext.projection.projector import KroneckerProjector
    from hf_gradext.store import ShardWriter

    out = full_grads_output(fargs.output_dir)
    mode = choose_mode(fargs.overwrite, fargs.resume, FLAGS[1], FLAGS[2])
    refuse_fresh_into_rows(out, mode)  # before the model is loaded
    rargs = ProjectRunArguments(max_samples=fargs.max_samples, split=fargs.split, seed=fargs.seed)
    tokenizer, model = load_model_for_pass(margs, rargs, getattr(margs, "block_size", None))
    model.to(fargs.device).eval()
    layers, keep = fargs.layers, None
    if layers == "projected":  # a metadata.json that does not fit the model fails before the data
        projector = KroneckerProjector.from_metadata(fargs.proj_metadata, model)
        layers, keep = projector.capture_layers(), [b.weight_name for b in projector.blocks]
    pre = preconditioner_from_args(model, fargs)  # a state that does not fit fails before the data
    pre_record = None if pre is None else pre.describe("exact")
    data = load_data_for_pass(margs, rargs, tokenizer)
    settings = {
        "layers": layers,
        "stored_parameters": keep,
        "grad_dtype": fargs.grad_dtype,
        "data": data_settings(margs, fargs.split),
    }
    if pre_record is not None:  # absent when off, as in the projection metadata
        settings["preconditioning"] = {k: v for k, v in pre_record.items() if k != "source"}
    prepare_output_dir(out, mode, RunFingerprint(WRITER, settings, model_fingerprint(model)))
    done = completed_example_ids(out.path, PREFIX) if mode == "resume" else set()
    todo = [pos for pos, e in enumerate(data["example_id"]) if int(e) not in done]
    dtype = getattr(torch, fargs.grad_dtype)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    writer = ShardWriter(fargs.output_dir, prefix=PREFIX, flag=FLAGS[0])
    slices: dict[str, dict[str, Any]] | None = None
    total = 0
    for first in range(0, len(todo), fargs.batch_size):
        chunk = data[todo[first : first + fargs.batch_size]]
        batch = {
            k: torch.as_tensor(chunk[k]).to(fargs.device)
            for k in ("input_ids", "attention_mask", "labels")
            if k in chunk
        }
        grads = per_sample_gradients(model, batch, layers=layers, dtype=dtype)
        if pre is not None:
            grads = pre.apply(grads)  # exact: s ** power * G elementwise, (B, *shape)
        order = [n for n in names if n in grads and (keep is None or n in keep)]
        if slices is None:
            slices, start = {}, 0
            for n in order:
                shape = list(grads[n].shape[1:])
                size = int(torch.tensor(shape).prod()) if shape else 1
                slices[n] = {"start": start, "end": start + size, "shape": shape}
                start += size
            total = start
            if total * len(data) > fargs.max_elements:
                raise UserFacingError(
                    f"{len(data)} samples x {total} values exceeds --max_elements={fargs.max_elements}; lower "
                    "--max_samples, use --layers projected, or raise --max_elements"
                )
            write_json_atomic(
                Path(fargs.output_dir) / META_FILE,
                {
                    "param_slices": slices,
                    "total_param_dim": total,
                    "layers": fargs.layers,
                    "proj_metadata": fargs.proj_metadata,
                    "dtype": fargs.grad_dtype,
                    "loss": "each sample's own mean token loss over labels != -100",
                    "preconditioning": pre_record,
                },
                flag=FLAGS[0],
            )
        flat = torch.cat([_dense(grads[n]).reshape(batch["input_ids"].shape[0], -1) for n in order], dim=1)
        writer.write({"grad": flat.to(dtype)}, [{"example_id": int(e)} for e in chunk["example_id"]])
    writer.close()
    if slices is None and (out.path / META_FILE).is_file():  # a resumed run with nothing left to do
        total = int(_read_meta(out.path / META_FILE)["total_param_dim"])
    return {
        "examples": len(data),
        "written": len(todo),
        "skipped_already_done": len(data) - len(todo),
        "total_param_dim": total,
    }


def _read_meta(path: Path) -> dict[str, Any]:
    fix = f"rerun `hf-gradext full-grads --output_dir {path.parent} --overwrite`"
    meta = read_json(path, fix)
    if not isinstance(meta, dict) or not isinstance(meta.get("total_param_dim"), int):
        raise damaged(path, "no integer total_param_dim", fix)
    return meta


def _dense(grad: Any) -> torch.Tensor:
    return grad if isinstance(grad, torch.Tensor) else grad.to_dense()


def load_full_grads(directory: str | Path) -> tuple[torch.Tensor, list[int], dict[str, Any]]:
    """``(grads (N, P), example ids, fullgrad_meta)`` of a ``full-grads`` directory (loaded in RAM)."""
    from hf_gradext.store import list_shards, read_shard

    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise UserFacingError(
            f"{meta_path} not found; run `hf-gradext full-grads --output_dir {directory}` first"
        )
    meta = _read_meta(meta_path)
    parts, ids = [], []
    for info in list_shards(directory, PREFIX):
        tensors, rows, _ = read_shard(info.path)
        parts.append(tensors["grad"])
        ids.extend(int(r["example_id"]) for r in rows)
    return (torch.cat(parts) if parts else torch.empty(0, meta["total_param_dim"])), ids, meta
