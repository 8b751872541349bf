"""Transformer encoders as Flax linen modules: BERT-style text models and the Vision Transformer.

* `EncoderBlock`: multi-head self-attention and a GELU MLP, each a residual
  branch with dropout and optional stochastic depth, in the pre-LayerNorm
  (`pre_norm=True`, as in ViT) or post-LayerNorm (as in BERT) arrangement.
  Attention reads a padding mask, 1 for real tokens and 0 for padding, so
  no position attends to padding.
* `BertClassifier`: token, position and segment embeddings, the encoder, and
  a linear head on the first ([CLS]) token (Devlin et al. 2019, "BERT").
  `BertForMaskedLM` has the same `embeddings` and `encoder` subtrees and an
  `mlm_head` whose output layer is tied to the token embedding, so a
  pretrained tree loads into a classifier by name (see `jaxbase.transfer`).
* `VisionTransformer`: non-overlapping patches, learned position embeddings,
  a class token or global average pooling, and a linear head (Dosovitskiy et
  al. 2021, "An Image is Worth 16x16 Words").

Sizes come from variant tables: `BERT_VARIANTS` (tiny / mini / small /
medium / base) and `VIT_VARIANTS` (Ti / S / B, with a patch size, as in
'S/4'). As with the ResNets, image models take `[0, 1]` pixels and normalize
them first, parameters are stored in `param_dtype`, computation runs in
`dtype`, and logits are float32.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxbase.kernels import conv as kernel_conv
from jaxbase.models.resnet import CIFAR10_MEAN, CIFAR10_STD, normalize_images

Dtype = Any
Initializer = Any

# Compact BERT shapes of Turc et al. 2019 ("Well-Read Students Learn Better"),
# base from Devlin et al. 2019: L layers of width H, H / 64 heads, 4H MLP.
BERT_VARIANTS: dict[str, dict[str, int]] = {
    "tiny": dict(num_layers=2, width=128, num_heads=2, mlp_dim=512),
    "mini": dict(num_layers=4, width=256, num_heads=4, mlp_dim=1024),
    "small": dict(num_layers=4, width=512, num_heads=8, mlp_dim=2048),
    "medium": dict(num_layers=8, width=512, num_heads=8, mlp_dim=2048),
    "base": dict(num_layers=12, width=768, num_heads=12, mlp_dim=3072),
}

# ViT-B from Dosovitskiy et al. 2021; Ti and S from Touvron et al. 2021 (DeiT).
VIT_VARIANTS: dict[str, dict[str, int]] = {
    "Ti": dict(num_layers=12, width=192, num_heads=3, mlp_dim=768),
    "S": dict(num_layers=12, width=384, num_heads=6, mlp_dim=1536),
    "B": dict(num_layers=12, width=768, num_heads=12, mlp_dim=3072),
}

POOL_TYPES = ("token", "gap")
BERT_POOL_TYPES = ("cls", "mean")

# BERT initializes every weight matrix and embedding from N(0, 0.02^2), truncated at 2 std.
bert_init = nn.initializers.truncated_normal(0.02)


def bert_variant(name: str) -> dict[str, int]:
  """Return the layer count, width, heads and MLP size of a BERT variant.

  Args:
    name: a key of `BERT_VARIANTS`, e.g. 'mini'.

  Raises:
    ValueError: on an unknown name; the message lists the valid ones.
  """
  if name not in BERT_VARIANTS:
    raise ValueError(f"unknown BERT variant {name!r}; valid variants: {', '.join(BERT_VARIANTS)}")
  return dict(BERT_VARIANTS[name])


def vit_variant(name: str) -> dict[str, int]:
  """Return the sizes and patch size of a ViT variant written 'SIZE/PATCH', e.g. 'S/4'.

  Args:
    name: a size of `VIT_VARIANTS` (case-insensitive), a slash and a
      positive patch size in pixels.

  Returns:
    `num_layers`, `width`, `num_heads`, `mlp_dim` and `patch_size`.

  Raises:
    ValueError: on an unknown size or a malformed patch size; the message
      lists the valid sizes.
  """
  size, _, patch = name.partition("/")
  sizes = {key.lower(): key for key in VIT_VARIANTS}
  if size.lower() not in sizes or not patch.isdigit() or int(patch) < 1:
    raise ValueError(
        f"unknown ViT variant {name!r}; valid variants are SIZE/PATCH with SIZE one of "
        f"{', '.join(VIT_VARIANTS)} and PATCH a patch size in pixels, e.g. 'S/4'"
    )
  return dict(VIT_VARIANTS[sizes[size.lower()]], patch_size=int(patch))


def attention_mask_from_padding(padding_mask):
  """Turn a padding mask [batch, length] (1 real, 0 padding) into a key mask.

  Returns:
    bool[batch, 1, 1, length], broadcast over heads and query positions, so
    every query attends to the real keys only. Queries at padded positions
    still get an output, which callers ignore.
  """
  return padding_mask.astype(bool)[:, None, None, :]


class MlpBlock(nn.Module):
  """Dense to `mlp_dim`, exact GELU, dropout, dense back to the input width."""

  mlp_dim: int
  dropout_rate: float = 0.0
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    width = x.shape[-1]
    dense = lambda features, name: nn.Dense(
        features,
        kernel_init=self.kernel_init,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
    )
    x = nn.gelu(dense(self.mlp_dim, "dense1")(x), approximate=False)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return dense(width, "dense2")(x)


class EncoderBlock(nn.Module):
  """Self-attention and MLP residual branches, with pre- or post-LayerNorm.

  Pre-LN computes `x + drop(branch(norm(x)))` for each branch; post-LN
  computes `norm(x + drop(branch(x)))`. `drop` is dropout followed by
  stochastic depth (Huang et al. 2016), which in training zeroes the whole
  branch of an example with probability `drop_path_rate` and scales kept
  branches by `1 / (1 - drop_path_rate)`.

  Attributes:
    num_heads: attention heads; the width must be divisible by it.
    mlp_dim: hidden size of the MLP.
    dropout_rate: dropout on each branch output and inside the MLP.
    attention_dropout_rate: dropout on the attention probabilities.
    drop_path_rate: probability of dropping a branch for an example.
    pre_norm: pre-LN (True) or post-LN (False).
    kernel_init: initializer of every dense kernel.
    layer_norm_epsilon: epsilon of the LayerNorms.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  pre_norm: bool = True
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, attention_mask, train: bool):
    """Apply the block to `x: [batch, length, width]`.

    Args:
      x: token representations.
      attention_mask: bool, broadcastable to [batch, heads, length, length];
        False where a query must not attend to a key. None attends everywhere.
      train: apply dropout and stochastic depth from the 'dropout' rng.

    Returns:
      [batch, length, width].
    """
    norm = lambda name: nn.LayerNorm(
        epsilon=self.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    # Dropout broadcast over the length and width axes drops a whole branch per example.
    drop_path = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2), deterministic=not train)
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
    attention = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        dropout_rate=self.attention_dropout_rate,
        deterministic=not train,
        kernel_init=self.kernel_init,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="attention",
    )
    mlp = MlpBlock(
        self.mlp_dim,
        dropout_rate=self.dropout_rate,
        kernel_init=self.kernel_init,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="mlp",
    )

    if self.pre_norm:
      y = attention(norm("attention_norm")(x), mask=attention_mask)
      x = x + drop_path(dropout(y))
      y = mlp(norm("mlp_norm")(x), train)
      return x + drop_path(dropout(y))

    y = attention(x, mask=attention_mask)
    x = norm("attention_norm")(x + drop_path(dropout(y)))
    y = mlp(x, train)
    return norm("mlp_norm")(x + drop_path(dropout(y)))


class Encoder(nn.Module):
  """A stack of `EncoderBlock`s named `block_0` ... `block_{num_layers - 1}`.

  Stochastic depth rises linearly from 0 at the first block to
  `drop_path_rate` at the last (Huang et al. 2016). Pre-LN stacks end with a
  LayerNorm (`final_norm`), because their residual stream is never
  normalized otherwise.
  """

  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  pre_norm: bool = True
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, attention_mask, train: bool):
    for index in range(self.num_layers):
      rate = self.drop_path_rate * index / max(self.num_layers - 1, 1)
      x = EncoderBlock(
          num_heads=self.num_heads,
          mlp_dim=self.mlp_dim,
          dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate,
          drop_path_rate=rate,
          pre_norm=self.pre_norm,
          kernel_init=self.kernel_init,
          layer_norm_epsilon=self.layer_norm_epsilon,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"block_{index}",
      )(x, attention_mask, train)
    if self.pre_norm:
      x = nn.LayerNorm(
          epsilon=self.layer_norm_epsilon,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name="final_norm",
      )(x)
    return x


def _check_rates(module) -> None:
  for field in ("dropout_rate", "attention_dropout_rate", "drop_path_rate"):
    value = getattr(module, field)
    if not 0 <= value < 1:
      raise ValueError(f"{field} must be in [0, 1), got {value}")


class TextEmbeddings(nn.Module):
  """Sum of token, learned position and segment embeddings, then LayerNorm and dropout."""

  vocab_size: int
  max_length: int
  width: int
  num_segments: int = 2
  dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-12
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    embed = lambda count, name: nn.Embed(
        count,
        self.width,
        embedding_init=bert_init,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
    )
    self.token_embed = embed(self.vocab_size, "token_embed")
    self.position_embed = embed(self.max_length, "position_embed")
    self.segment_embed = embed(self.num_segments, "segment_embed")
    self.norm = nn.LayerNorm(
        epsilon=self.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype
    )
    self.dropout = nn.Dropout(self.dropout_rate)

  def __call__(self, token_ids, segment_ids, train: bool):
    positions = jnp.arange(token_ids.shape[1])[None, :]
    x = self.token_embed(token_ids) + self.position_embed(positions)
    x = x + self.segment_embed(segment_ids)
    return self.dropout(self.norm(x), deterministic=not train)

  def attend(self, x):
    """Project `x: [..., width]` onto the token embeddings: logits [..., vocab_size]."""
    return self.token_embed.attend(x)


class _BertBase(nn.Module):
  """Fields and input checks shared by the BERT classifier and the masked LM."""

  vocab_size: int
  max_length: int
  num_layers: int
  width: int
  num_heads: int
  mlp_dim: int
  num_segments: int = 2
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  drop_path_rate: float = 0.0
  pre_norm: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _check_inputs(self, token_ids, padding_mask, segment_ids):
    _check_rates(self)
    if self.width % self.num_heads:
      raise ValueError(
          f"width {self.width} is not divisible by num_heads {self.num_heads}; "
          "pick a head count that divides the width"
      )
    if token_ids.ndim != 2 or not jnp.issubdtype(token_ids.dtype, jnp.integer):
      raise ValueError(
          f"token_ids must be integer [batch, length], got {token_ids.dtype} of shape "
          f"{tuple(token_ids.shape)}"
      )
    if token_ids.shape[1] > self.max_length:
      raise ValueError(
          f"token_ids have length {token_ids.shape[1]}, longer than the model's max_length "
          f"{self.max_length}; truncate the inputs (jaxbase.data.text does) or build the model "
          "with a larger max_length"
      )
    for name, array in (("padding_mask", padding_mask), ("segment_ids", segment_ids)):
      if array is not None and tuple(array.shape) != tuple(token_ids.shape):
        raise ValueError(
            f"{name} has shape {tuple(array.shape)} but token_ids have shape "
            f"{tuple(token_ids.shape)}; they must match"
        )

  def _encode(self, token_ids, padding_mask, segment_ids, train: bool):
    """Return the embeddings module and the encoder output [batch, length, width]."""
    self._check_inputs(token_ids, padding_mask, segment_ids)
    if padding_mask is None:
      padding_mask = jnp.ones(token_ids.shape, jnp.int32)
    if segment_ids is None:
      segment_ids = jnp.zeros(token_ids.shape, jnp.int32)
    embeddings = TextEmbeddings(
        vocab_size=self.vocab_size,
        max_length=self.max_length,
        width=self.width,
        num_segments=self.num_segments,
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="embeddings",
    )
    x = embeddings(token_ids, segment_ids, train)
    x = Encoder(
        num_layers=self.num_layers,
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        drop_path_rate=self.drop_path_rate,
        pre_norm=self.pre_norm,
        kernel_init=bert_init,
        layer_norm_epsilon=1e-12,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="encoder",
    )(x, attention_mask_from_padding(padding_mask), train)
    return embeddings, x


class BertClassifier(_BertBase):
  """BERT-style sequence classifier: embeddings, encoder, linear head on [CLS].

  `pool='mean'` reads the head from the mean over real tokens instead. MLM
  pretraining never trains the [CLS] output (there is no next-sentence task),
  while every other position learns to describe its token, so a model
  fine-tuned from MLM alone on few labels has more to start from in the mean.

  Attributes:
    vocab_size: rows of the token embedding; the tokenizer's vocabulary size.
    max_length: rows of the position embedding; longer inputs raise.
    num_layers, width, num_heads, mlp_dim: encoder sizes (`BERT_VARIANTS`).
    num_classes: size of the logits.
    num_segments: rows of the segment embedding (2 for sentence pairs).
    dropout_rate: dropout on embeddings, branch outputs, the MLP and the
      pooled vector before the head.
    attention_dropout_rate: dropout on attention probabilities.
    drop_path_rate: stochastic depth at the last block.
    pre_norm: pre-LN blocks; BERT itself is post-LN (False).
    dtype: compute dtype. Logits are float32 regardless.
    param_dtype: parameter dtype.
    pool: 'cls' (the first token's output, BERT's choice) or 'mean' (the
      mean of the outputs at real tokens, [CLS] and [SEP] included).
  """

  num_classes: int = 2
  pool: str = "cls"

  @nn.compact
  def __call__(self, token_ids, train: bool, *, padding_mask=None, segment_ids=None):
    """Compute class logits from the first token's output or the token mean.

    Args:
      token_ids: int[batch, length], `length <= max_length`, with [CLS] first.
      train: apply dropout and stochastic depth from the 'dropout' rng.
      padding_mask: int or bool [batch, length], 1 for real tokens and 0 for
        padding; None treats every token as real.
      segment_ids: int[batch, length] in [0, num_segments); None is all 0.

    Returns:
      float32[batch, num_classes].

    Raises:
      ValueError: on token_ids that are not integer rank 2, longer than
        `max_length`, or masks of another shape.
    """
    if self.pool not in BERT_POOL_TYPES:
      raise ValueError(f"unknown pool {self.pool!r}; expected one of {BERT_POOL_TYPES}")
    _, x = self._encode(token_ids, padding_mask, segment_ids, train)
    if self.pool == "cls":
      pooled = x[:, 0]
    else:
      if padding_mask is None:
        weights = jnp.ones(x.shape[:2], jnp.float32)
      else:
        weights = (jnp.asarray(padding_mask) != 0).astype(jnp.float32)
      weights = weights / jnp.maximum(weights.sum(axis=1, keepdims=True), 1.0)
      pooled = jnp.einsum("bl,blw->bw", weights.astype(x.dtype), x)
    pooled = nn.Dropout(self.dropout_rate, deterministic=not train)(pooled)
    logits = nn.Dense(
        self.num_classes,
        kernel_init=bert_init,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="head",
    )(pooled)
    return logits.astype(jnp.float32)


class BertForMaskedLM(_BertBase):
  """BERT with a masked-language-model head, for pretraining.

  The head is BERT's: dense, GELU and LayerNorm, then a projection onto the
  token embedding matrix (tied weights) plus a per-token bias. Its
  `embeddings` and `encoder` subtrees have the names and shapes of
  `BertClassifier`'s. Attributes are those of `BertClassifier` without
  `num_classes`.
  """

  @nn.compact
  def __call__(
      self, token_ids, train: bool, *, padding_mask=None, segment_ids=None, masked_positions=None
  ):
    """Compute vocabulary logits at every position, or only at `masked_positions`.

    Args:
      token_ids: int[batch, length], with the masked tokens already replaced.
      train: apply dropout from the 'dropout' rng.
      padding_mask: as in `BertClassifier`.
      segment_ids: as in `BertClassifier`.
      masked_positions: int[batch, predictions] positions to predict; None
        predicts every position. Predicting a few positions saves the
        vocabulary projection of the rest.

    Returns:
      float32[batch, predictions or length, vocab_size].
    """
    embeddings, x = self._encode(token_ids, padding_mask, segment_ids, train)
    if masked_positions is not None:
      x = jnp.take_along_axis(x, masked_positions[..., None], axis=1)
    x = nn.Dense(
        self.width,
        kernel_init=bert_init,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="mlm_transform",
    )(x)
    x = nn.LayerNorm(
        epsilon=1e-12, dtype=self.dtype, param_dtype=self.param_dtype, name="mlm_norm"
    )(nn.gelu(x, approximate=False))
    bias = self.param("mlm_bias", nn.initializers.zeros, (self.vocab_size,), self.param_dtype)
    logits = embeddings.attend(x).astype(jnp.float32) + bias.astype(jnp.float32)
    return logits


class VisionTransformer(nn.Module):
  """Vision Transformer classifier on [0, 1] pixels.

  The position embedding `position_embed` has shape [1, tokens, width], where
  tokens is `(height / patch) * (width / patch)`, plus one leading row for the
  class token when `pool == 'token'`. `jaxbase.transfer` resizes it for
  another image size.

  Attributes:
    num_classes: size of the logits.
    patch_size: side of the square patches in pixels; it must divide the
      image height and width.
    num_layers, width, num_heads, mlp_dim: encoder sizes (`VIT_VARIANTS`).
    pool: 'token' (a learned class token, read out after the encoder) or
      'gap' (the mean of the patch tokens).
    dropout_rate: dropout after the position embedding, on branch outputs and
      in the MLP.
    attention_dropout_rate: dropout on attention probabilities.
    drop_path_rate: stochastic depth at the last block.
    mean: per-channel mean of [0, 1] input pixels, subtracted first.
    std: per-channel standard deviation of [0, 1] input pixels.
    dtype: compute dtype. Logits are float32 regardless.
    param_dtype: parameter dtype.
    conv_impl: kernels of the patch embedding: 'auto' (oneDNN on the CPU
      backend when available, else XLA), 'onednn' or 'xla'; see
      `jaxbase.kernels.conv`.
  """

  num_classes: int
  patch_size: int
  num_layers: int
  width: int
  num_heads: int
  mlp_dim: int
  pool: str = "token"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  mean: Sequence[float] = CIFAR10_MEAN
  std: Sequence[float] = CIFAR10_STD
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  def _check(self, images):
    _check_rates(self)
    if self.pool not in POOL_TYPES:
      raise ValueError(f"unknown pool {self.pool!r}; expected one of {POOL_TYPES}")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(
          f"images must be float [batch, height, width, channels] in [0, 1], got "
          f"{images.dtype} of shape {tuple(images.shape)}; convert uint8 with "
          "images.astype(jnp.float32) / 255"
      )
    height, width = images.shape[1:3]
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(
          f"patch_size {self.patch_size} does not divide the image size {height}x{width}; "
          "pick a patch size that divides both sides"
      )

  @nn.compact
  def __call__(self, images, train: bool):
    """Compute class logits.

    Args:
      images: float[batch, height, width, channels] in [0, 1].
      train: apply dropout and stochastic depth from the 'dropout' rng.

    Returns:
      float32[batch, num_classes].
    """
    self._check(images)
    x = normalize_images(images, self.mean, self.std).astype(self.dtype)
    x = nn.Conv(
        self.width,
        (self.patch_size, self.patch_size),
        strides=(self.patch_size, self.patch_size),
        padding="VALID",
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        conv_general_dilated=kernel_conv.conv_fn(self.conv_impl),
        name="patch_embed",
    )(x)
    batch = x.shape[0]
    x = x.reshape(batch, -1, self.width)
    if self.pool == "token":
      class_token = self.param(
          "class_token", nn.initializers.zeros, (1, 1, self.width), self.param_dtype
      )
      x = jnp.concatenate([jnp.tile(class_token.astype(self.dtype), (batch, 1, 1)), x], axis=1)
    position_embed = self.param(
        "position_embed",
        nn.initializers.normal(0.02),
        (1, x.shape[1], self.width),
        self.param_dtype,
    )
    x = x + position_embed.astype(self.dtype)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = Encoder(
        num_layers=self.num_layers,
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        drop_path_rate=self.drop_path_rate,
        pre_norm=True,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="encoder",
    )(x, None, train)
    x = x[:, 0] if self.pool == "token" else jnp.mean(x, axis=1)
    # A zero head starts every class at the same logit, as big_vision's ViT does.
    logits = nn.Dense(
        self.num_classes,
        kernel_init=nn.initializers.zeros,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="head",
    )(x)
    return logits.astype(jnp.float32)
