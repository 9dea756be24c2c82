"""The peers' adapters of attribution_lds.py: each returns ``{(method, D): fn(seed)}`` on the same model, data and
weights as hf_gradext's methods (``fn`` gives (train rows, query rows), or for TRAK its own (Q, N) scores).

Versions used, and how they were installed next to a CPU torch: attribution_lds.py's docstring and
docs/projection.md. Each adapter imports its package when called, so a missing peer is skipped there.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import tempfile

import torch


def bergson_methods(model, train_ids, query_ids, dims_p, optimizer_pt: str, tmp: str) -> dict:
    """bergson's in-memory collector (its public API), per-module p x p projection of the same weights."""
    from bergson import CollectorComputer, GradientProcessor, IndexConfig, InMemoryCollector
    from bergson.utils.load_from_optimizer import load_from_optimizer
    from datasets import Dataset

    targets = {n for n, m in model.transformer.named_modules() if type(m).__name__ == "Conv1D"}

    def collect(ids, p, normalizers, seed):
        data = Dataset.from_dict({"input_ids": ids.tolist()})
        cfg = IndexConfig(run_path=os.path.join(tmp, "bergson"), projection_dim=p, loss_reduction="mean")
        os.makedirs(cfg.partial_run_path, exist_ok=True)
        processor = GradientProcessor(normalizers=normalizers, projection_dim=p, projection_seed=seed)
        collector = InMemoryCollector(
            model=model.base_model, cfg=cfg, processor=processor, data=data, target_modules=targets
        )
        batches = [list(range(s, min(s + 32, len(ids)))) for s in range(0, len(ids), 32)]
        CollectorComputer(
            model=model, data=data, collector=collector, batches=batches, cfg=cfg
        ).run_with_collector_hooks()
        return torch.cat(
            [collector.gradients[n].float() for n in sorted(collector.gradients)], dim=1
        ).double()

    out = {}
    for p in dims_p:
        d = p * p * len(targets)

        def plain(seed, p=p):
            return collect(train_ids, p, {}, seed), collect(query_ids, p, {}, seed)

        def adam(seed, p=p):
            norms = load_from_optimizer(model, optimizer_pt, target_modules=targets)
            return collect(train_ids, p, norms, seed), collect(query_ids, p, {}, seed)

        out[("bergson", d)], out[("bergson_adam", d)] = plain, adam
    return out


def dattri_methods(model, train_ids, query_ids, dims, names: list[str]) -> dict:
    """dattri's TRAKAttributor (its own score) on the same weights, dense projection to D."""
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    def margin(params, data):
        ids = data[0]  # (T,): one TensorDataset row, vmapped
        logits = torch.func.functional_call(model, params, (ids.unsqueeze(0),)).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, ids[1:])
        logp = -loss
        return logp - torch.log1p(-torch.exp(logp))  # logit of p = exp(-mean token loss)

    def prob(params, data):
        ids = data[0]
        logits = torch.func.functional_call(model, params, (ids.unsqueeze(0),)).logits[0, :-1]
        return torch.exp(-torch.nn.functional.cross_entropy(logits, ids[1:]))

    def run(seed, d):
        task = AttributionTask(loss_func=margin, model=model, checkpoints=model.state_dict())
        attributor = TRAKAttributor(
            task=task, correct_probability_func=prob, device="cpu", layer_name=names,
            projector_kwargs={"proj_dim": d, "proj_max_batch_size": 32, "proj_seed": seed, "device": "cpu"},
        )  # fmt: skip
        loader = torch.utils.data.DataLoader
        attributor.cache(loader(torch.utils.data.TensorDataset(train_ids), batch_size=32, shuffle=False))
        return attributor.attribute(loader(torch.utils.data.TensorDataset(query_ids), batch_size=32)).T

    return {("dattri_trak", d): functools.partial(run, d=d) for d in dims}


def traker_methods(model, train_ids, query_ids, dims, names: list[str], tmp: str) -> dict:
    """traker's TRAKer (its own score) with its CPU BasicProjector, on the same weights and model output."""
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import BasicProjector, ProjectionType

    class LMOutput(AbstractModelOutput):
        """f = logit of p = exp(-mean token loss); Q = 1 - p (TRAK's reweighting)."""

        def __init__(self) -> None:
            pass

        @staticmethod
        def get_output(model, weights, buffers, ids):
            logits = torch.func.functional_call(model, (weights, buffers), (ids.unsqueeze(0),)).logits[0, :-1]
            logp = -torch.nn.functional.cross_entropy(logits, ids[1:])
            return logp - torch.log1p(-torch.exp(logp))

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            (ids,) = batch
            logits = torch.func.functional_call(model, (weights, buffers), (ids,)).logits[:, :-1]
            tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            return (1 - torch.exp(-tok.mean(dim=1))).detach().unsqueeze(-1)

    grad_dim = sum(p.numel() for n, p in model.named_parameters() if n in names)

    def run(seed, d):
        projector = BasicProjector(grad_dim, d, seed=seed, proj_type=ProjectionType.normal, device="cpu")
        traker = TRAKer(
            model=model, task=LMOutput(), train_set_size=len(train_ids), save_dir=tempfile.mkdtemp(dir=tmp),
            device="cpu", projector=projector, use_half_precision=False, grad_wrt=names,
            logging_level=logging.WARNING,
        )  # fmt: skip
        state = {k: v for k, v in model.state_dict().items()}
        traker.load_checkpoint(state, model_id=0)
        for chunk in train_ids.split(32):
            traker.featurize(batch=(chunk,), num_samples=len(chunk))
        traker.finalize_features()
        traker.start_scoring_checkpoint("lds", state, model_id=0, num_targets=len(query_ids))
        for chunk in query_ids.split(32):
            traker.score(batch=(chunk,), num_samples=len(chunk))
        return torch.as_tensor(traker.finalize_scores("lds")).T.double()  # (Q, N)

    return {("traker", d): functools.partial(run, d=d) for d in dims}


def peer_versions() -> dict[str, str]:
    out = {}
    for name in ("bergson", "dattri", "traker", "logix-ai"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
