"""Training: state, per-replica steps, the data-parallel launcher and the loop."""

from jaxbase.train.loop import train_and_evaluate
from jaxbase.train.parallel import DataParallel, make_mesh
from jaxbase.train.state import TrainState, create_train_state
from jaxbase.train.steps import (
    make_eval_step,
    make_mlm_eval_step,
    make_mlm_train_step,
    make_train_step,
)

__all__ = [
    "DataParallel",
    "TrainState",
    "create_train_state",
    "make_eval_step",
    "make_mesh",
    "make_mlm_eval_step",
    "make_mlm_train_step",
    "make_train_step",
    "train_and_evaluate",
]
