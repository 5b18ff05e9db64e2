"""Training: the experiment config, optimizers, the sharded step and the loop."""

from llmjax.train.config import base_config, model_config, objective_config
from llmjax.train.loop import evaluate, train
from llmjax.train.trainer import build
