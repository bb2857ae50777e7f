"""Training: the train loop, optimizer, orbax checkpoints, metric writers, config checks and the
sweep leaderboard; attention-based training methods: `regularizers` (losses on attention maps),
`quantization` (DQA, #230) and `pruning` (ASWL, #169), and `weight_methods`, which applies either
to any model by the flag `train.weight_method`."""

from attnjax.train import pruning
from attnjax.train import quantization
from attnjax.train import weight_methods
from attnjax.train.checkpoint import Checkpointer
from attnjax.train.metrics import MetricWriter
from attnjax.train.metrics import read_jsonl
from attnjax.train.optim import make_optimizer
from attnjax.train.trainer import PREEMPTED_EXIT_CODE
from attnjax.train.trainer import train_and_evaluate
from attnjax.train.validate import validate_config

__all__ = [
    "Checkpointer", "MetricWriter", "PREEMPTED_EXIT_CODE", "make_optimizer", "pruning", "quantization",
    "read_jsonl", "train_and_evaluate", "validate_config", "weight_methods",
]
