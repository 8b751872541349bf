"""The training state: everything a checkpoint needs to continue a run exactly."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Params, BatchNorm statistics, optimizer state, step and root RNG key.

  Every field is an array pytree, so the whole state is jitted, donated and
  checkpointed as one tree. The model and optimizer are not stored: they are
  rebuilt from the config, which the checkpoint also records.

  Attributes:
    step: int32 scalar, the number of optimizer steps taken. The data position
      is derived from it (epoch = step // steps_per_epoch).
    params: model parameters (float32).
    batch_stats: BatchNorm running statistics; an empty dict for models without
      BatchNorm.
    opt_state: optax optimizer state.
    key: uint32[2] root PRNG key of the run. Steps fold in the step number and
      the replica index, so the key itself never changes.
    ema: None, or `{"params", "batch_stats"}` holding an exponential moving
      average of both, which evaluation then uses in place of the raw ones.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  key: jax.Array
  ema: Any = None

  def eval_variables(self) -> dict[str, Any]:
    """Returns the variables evaluation and attacks use: the moving average when there is one."""
    if self.ema is not None:
      return {"params": self.ema["params"], "batch_stats": self.ema["batch_stats"]}
    return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(
    model: flax.linen.Module,
    optimizer: optax.GradientTransformation,
    example_inputs: jax.Array | dict[str, jax.Array],
    seed: int,
    *,
    ema: bool = False,
) -> TrainState:
  """Initializes the model and optimizer from `seed`.

  Args:
    model: a flax module called as `model(images, train=...)`, or with
      keyword inputs such as `model(token_ids=..., padding_mask=...,
      train=...)`.
    optimizer: the optax transformation the run uses.
    example_inputs: float[batch, height, width, channels] images, or a dict
      of the model's keyword inputs; only shapes and dtypes matter.
    seed: the run seed. The init key and the training key are separate
      streams of it.
    ema: keep a moving average of the params and BatchNorm statistics,
      starting from their initial values.

  Returns:
    A TrainState at step 0, on the default device.
  """
  root = jax.random.PRNGKey(seed)
  init_key, train_key = jax.random.split(root)

  @jax.jit
  def init(init_key):
    rngs = {"params": init_key, "dropout": init_key}
    if isinstance(example_inputs, dict):
      variables = model.init(rngs, **example_inputs, train=False)
    else:
      variables = model.init(rngs, example_inputs, train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=optimizer.init(params),
        key=train_key,
        ema={"params": params, "batch_stats": batch_stats} if ema else None,
    )

  return init(init_key)
