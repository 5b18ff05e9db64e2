"""Training: the experiment config, optimizers, the sharded step and the loop.

    config.py      the experiment config (`base_config`, `model_config`, `objective_config`)
    experiment.py  a config made into a run's parts (`build`) and its data (`make_pipeline`)
    step.py        the jitted steps over any model and objective (`init_state`,
                   `make_train_step`, `make_eval_step`, `batch_shardings`, `global_batch`)
    loop.py        `train(config, workdir)`: steps, evals, metrics, checkpoints, signals
    workdir.py     the run's directory, local or gs://
"""

from llmjax.train.config import base_config, model_config, objective_config, shrink_for_cpu
from llmjax.train.experiment import Setup, build, make_pipeline
from llmjax.train.checkpoints import CheckpointError
from llmjax.train.loop import Result, evaluate, train
from llmjax.train.step import (Parts, batch_shardings, eval_step, global_batch, init_state,
                               make_eval_step, make_train_step, train_step)
