"""Per-sample gradient collection: collector, chunking under a memory budget, statistics, streaming.

Public API:
    BatchCollector   collect per-sample gradients of batches outside a Trainer (own fp32 pass)
    StepCollector    turns captured contributions into norms, statistics and shards (one step)
    GradientSink     packs and streams pieces into safetensors shards (one step per shard)
    collection_stats per-group norm statistics as flat metrics
    loop_per_sample_gradients   reference loop (one backward per sample)
"""

from hf_gradext.collection.api import BatchCollector
from hf_gradext.collection.collector import StepCollector
from hf_gradext.collection.loop import loop_per_sample_gradients
from hf_gradext.collection.sink import GradientSink, prune_after_step
from hf_gradext.collection.stats import collection_stats, norm_summary

__all__ = [
    "BatchCollector",
    "GradientSink",
    "StepCollector",
    "collection_stats",
    "loop_per_sample_gradients",
    "norm_summary",
    "prune_after_step",
]
