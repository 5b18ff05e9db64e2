"""Training: the experiment config, optimizers, the sharded step and the loop."""

from llmjax.train.config import base_config, model_config, objective_config, shrink_for_cpu
from llmjax.train.loop import CheckpointError, evaluate, train
from llmjax.train.trainer import build
