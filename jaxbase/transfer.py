"""Transfer learning: load a pretrained tree into a new model, freeze it, decay it by layer.

* `restore_params` reads the parameters and metadata of a checkpoint written
  by the training loop, whatever model and optimizer wrote it.
* `load_pretrained` copies every parameter of a new model from a pretrained
  tree, except the head, which keeps its fresh initialization (head
  replacement). Missing parameters and shape mismatches raise an error that
  names them; ViT position embeddings can be resized instead.
* `resize_position_embeddings` interpolates a ViT position embedding to a
  new patch grid.
* `param_groups` labels parameters for `optim.build`: frozen backbone
  (linear probe) or a learning-rate scale per layer (layer-wise decay).
"""

import math
import os
import re
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxbase import checkpoint as checkpoint_lib

# Top-level parameter names of the classification heads that fine-tuning
# replaces and a linear probe trains.
HEAD_NAMES = ("head",)
# Top-level parameters that sit below the first encoder block.
EMBEDDING_NAMES = ("embeddings", "patch_embed", "class_token", "position_embed")
FROZEN = "frozen"
_BLOCK_PATTERN = re.compile(r"block_(\d+)")


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _flatten(params: Any) -> dict[str, Any]:
  return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def restore_params(workdir: str, which: str = "latest") -> tuple[Any, dict[str, Any]]:
  """Read the parameters and JSON metadata of a checkpoint in a training work directory.

  `restore_variables` also returns the BatchNorm statistics.
  """
  variables, meta = restore_variables(workdir, which)
  return variables["params"], meta


def restore_variables(workdir: str, which: str = "latest") -> tuple[dict[str, Any], dict[str, Any]]:
  """Read the model variables and JSON metadata of a checkpoint in a training work directory.

  The state is restored from the checkpoint's own array metadata onto the
  first local device, so the restoring run needs neither the model nor the
  optimizer nor the device count of the run that wrote it.

  Args:
    workdir: the work directory of the pretraining run.
    which: 'latest' or 'best'.

  Returns:
    `(variables, meta)`: `{'params': ..., 'batch_stats': ...}` as nested dicts
    of arrays (`batch_stats` is empty for models without BatchNorm), and the
    checkpoint metadata (config, param_shapes, tokenizer for text runs).

  Raises:
    FileNotFoundError: if the directory or a checkpoint is missing.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(workdir):
    raise FileNotFoundError(
        f"pretrained work directory {workdir} not found; set init.checkpoint to the --workdir "
        "of a finished pretraining run"
    )
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  try:
    manager = checkpointer._manager(which)  # pylint: disable=protected-access
    step = manager.latest_step() if which == "latest" else manager.best_step()
    if step is None:
      raise FileNotFoundError(
          f"no {which} checkpoint in {manager.directory}; set init.checkpoint to the --workdir "
          "of a run that saved one (an interrupted run saves one only after its first "
          "checkpoint step)"
      )
    meta = checkpointer.restore_meta(step, which)
    # A StandardCheckpointer reads the item's own array metadata. The manager
    # cannot, because it learns the item's handler from its first save or restore.
    state_path = os.path.join(str(manager.directory), str(step), "state")
    reader = ocp.StandardCheckpointer()
    tree = reader.metadata(state_path).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda leaf: (
            jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
            if hasattr(leaf, "shape")
            else leaf
        ),
        tree,
    )
    restored = reader.restore(state_path, abstract)
  finally:
    checkpointer.close()
  logging.info("Read pretrained parameters of step %d from %s", step, workdir)
  return {"params": restored["params"], "batch_stats": restored.get("batch_stats") or {}}, meta


def resize_position_embeddings(
    position_embed: jax.Array, new_grid: tuple[int, int], *, has_class_token: bool
) -> jax.Array:
  """Resize a ViT position embedding to another patch grid by bilinear interpolation.

  Args:
    position_embed: [1, tokens, width], where tokens is `rows * columns` of
      a square patch grid, plus one leading class-token row when
      `has_class_token`.
    new_grid: (rows, columns) of the new patch grid.
    has_class_token: whether the first row belongs to the class token. It
      comes from the model config (`pool == 'token'`), not from the shape,
      because a 65-token table is 1 + 8x8 or a non-square grid.

  Returns:
    [1, new tokens, width]; the class-token row, if any, is copied
    unchanged. Resizing to the same grid returns the same values.

  Raises:
    ValueError: if the patch tokens do not form a square grid.
  """
  position_embed = jnp.asarray(position_embed)
  class_rows = position_embed[:, :1] if has_class_token else position_embed[:, :0]
  patch_rows = position_embed[:, 1:] if has_class_token else position_embed
  num_patches, width = patch_rows.shape[1], patch_rows.shape[2]
  side = math.isqrt(num_patches)
  if side * side != num_patches:
    raise ValueError(
        f"position embedding has {num_patches} patch tokens (class token: {has_class_token}), "
        "which is not a square grid; check model.pool"
    )
  grid = patch_rows.reshape(side, side, width).astype(jnp.float32)
  resized = jax.image.resize(grid, (*new_grid, width), method="bilinear")
  resized = resized.reshape(1, new_grid[0] * new_grid[1], width).astype(position_embed.dtype)
  return jnp.concatenate([class_rows, resized], axis=1)


def load_pretrained(
    params: Any,
    pretrained: Any,
    *,
    head_names: tuple[str, ...] = HEAD_NAMES,
    resize_position_embed: bool = False,
    has_class_token: bool = True,
) -> Any:
  """Copy pretrained parameters into a new model's tree, keeping its fresh head.

  Every parameter of `params` outside the top-level `head_names` subtrees is
  taken from `pretrained`. Parameters that only `pretrained` has (an MLM
  head, say) are ignored and logged.

  Args:
    params: the new model's freshly initialized parameters.
    pretrained: the pretrained parameters, e.g. from `restore_params`.
    head_names: top-level names kept from `params` (the replaced head).
    resize_position_embed: interpolate a `position_embed` of another size
      with `resize_position_embeddings` (ViT at another image size) instead
      of raising.
    has_class_token: passed to `resize_position_embeddings`.

  Returns:
    A tree with the structure of `params`.

  Raises:
    checkpoint.CheckpointMismatchError: if a non-head parameter is missing
      from `pretrained` or has another shape (a different vocabulary or model
      size). The message names every such parameter.
  """
  new_flat = _flatten(params)
  old_flat = _flatten(pretrained)
  is_head = lambda name: name.split("/")[0] in head_names

  missing, reshaped = [], []
  values = {}
  for name, leaf in new_flat.items():
    if is_head(name):
      values[name] = leaf
      continue
    if name not in old_flat:
      missing.append(f"{name} {list(np.shape(leaf))}")
      continue
    old = old_flat[name]
    if np.shape(old) != np.shape(leaf):
      if resize_position_embed and name.split("/")[-1] == "position_embed":
        old = _resize_like(old, leaf, has_class_token)
      else:
        reshaped.append(f"{name} {list(np.shape(old))} vs {list(np.shape(leaf))}")
        continue
    values[name] = jnp.asarray(old, dtype=jnp.asarray(leaf).dtype)

  if missing or reshaped:
    lines = []
    if missing:
      lines.append(f"  {len(missing)} in the new model only: " + ", ".join(missing))
    if reshaped:
      lines.append(
          f"  {len(reshaped)} with different shapes (checkpoint vs model): " + ", ".join(reshaped)
      )
    is_text = any("token_embed" in name for name in new_flat)
    if any("token_embed" in entry for entry in missing + reshaped):
      lines.append(
          "token_embed differs, so the vocabularies differ: fine-tune with the tokenizer of "
          "the pretraining run."
      )
    lines.append(
        "Other mismatches mean another model: use the pretraining run's model.name"
        + (" and model.max_length." if is_text else ".")
    )
    raise checkpoint_lib.CheckpointMismatchError(
        "the pretrained checkpoint does not match the new model:\n" + "\n".join(lines)
    )
  unused = sorted(name for name in old_flat if name not in new_flat)
  if unused:
    logging.info(
        "Ignoring %d pretrained parameters the new model does not have: %s",
        len(unused),
        ", ".join(unused[:10]) + (" ..." if len(unused) > 10 else ""),
    )
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  return jax.tree_util.tree_unflatten(
      treedef, [values[_path_name(path)] for path, _ in leaves_with_paths]
  )


def _resize_like(old, new, has_class_token: bool):
  num_new = new.shape[1] - (1 if has_class_token else 0)
  side = math.isqrt(num_new)
  if side * side != num_new:
    raise ValueError(f"new position embedding of shape {new.shape} is not a square grid")
  logging.info("Resizing position_embed from %s to %s", list(old.shape), list(new.shape))
  return resize_position_embeddings(old, (side, side), has_class_token=has_class_token)


def layer_index(name: str, num_layers: int) -> int:
  """Return the depth of a parameter: 0 for embeddings, i + 1 for block_i, num_layers + 1 above.

  Args:
    name: the parameter path, e.g. 'encoder/block_2/mlp/dense1/kernel'.
    num_layers: number of encoder blocks.
  """
  top = name.split("/")[0]
  if top in EMBEDDING_NAMES:
    return 0
  match = _BLOCK_PATTERN.search(name)
  if top == "encoder" and match:
    return int(match.group(1)) + 1
  return num_layers + 1


def param_groups(
    params: Any, *, freeze_backbone: bool = False, layer_decay: float = 1.0
) -> tuple[Any, dict[str, float]]:
  """Label every parameter with a learning-rate group for `optim.build`.

  Args:
    params: the model's parameters (arrays or `jax.ShapeDtypeStruct`s).
    freeze_backbone: train only the top-level `HEAD_NAMES` subtrees (a
      linear probe); everything else is in the group `FROZEN`.
    layer_decay: d in (0, 1]. Block i of L gets the learning rate times
      d^(L - i), embeddings d^(L + 1), and the head and final norm d^0 = 1
      (layer-wise decay as in Clark et al. 2020, "ELECTRA").

  Returns:
    `(labels, scales)`: a tree of group names with the structure of
    `params`, and each group's learning-rate multiplier; `FROZEN` maps to 0.

  Raises:
    ValueError: if both options are set, `layer_decay` is not in (0, 1], or
      freezing leaves nothing to train.
  """
  if not 0 < layer_decay <= 1:
    raise ValueError(f"optim.layer_decay must be in (0, 1], got {layer_decay}")
  if freeze_backbone and layer_decay != 1:
    raise ValueError(
        "optim.freeze_backbone and optim.layer_decay < 1 contradict each other; a frozen "
        "backbone has no learning rate to decay. Set one of them."
    )
  names = [_path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  treedef = jax.tree_util.tree_structure(params)
  if freeze_backbone:
    labels = ["head" if name.split("/")[0] in HEAD_NAMES else FROZEN for name in names]
    if "head" not in labels:
      raise ValueError(
          f"optim.freeze_backbone found no head parameters ({', '.join(HEAD_NAMES)}) to train"
      )
    return jax.tree_util.tree_unflatten(treedef, labels), {"head": 1.0, FROZEN: 0.0}

  blocks = {int(m.group(1)) for name in names if (m := _BLOCK_PATTERN.search(name))}
  num_layers = max(blocks) + 1 if blocks else 0
  depths = [layer_index(name, num_layers) for name in names]
  labels = [f"layer_{depth}" for depth in depths]
  scales = {f"layer_{depth}": layer_decay ** (num_layers + 1 - depth) for depth in set(depths)}
  return jax.tree_util.tree_unflatten(treedef, labels), scales
