"""Model FLOPs from a jaxpr: closed forms for dense layers, convolutions, loops and ResNet-20."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jaxbase import flops, models


def test_dense_layer():
  x = jnp.zeros((4, 3))
  w = jnp.zeros((3, 5))
  assert flops.count_flops(jnp.matmul, x, w) == 2 * 4 * 3 * 5


def test_grouped_strided_convolution():
  conv = nn.Conv(8, (3, 3), strides=2, feature_group_count=2, use_bias=False)
  x = jnp.zeros((2, 8, 8, 4))
  variables = conv.init(jax.random.key(0), x)
  # The output is 2x4x4x8, and each output reads a 3x3 window of 4 / 2 input channels.
  assert flops.count_flops(conv.apply, variables, x) == 2 * (2 * 4 * 4 * 8) * (9 * 2)


def test_transposed_convolution_counts_real_inputs():
  conv = nn.ConvTranspose(8, (3, 3), strides=(2, 2), use_bias=False)
  x = jnp.zeros((1, 8, 8, 4))
  variables = conv.init(jax.random.key(0), x)
  # Each of the 8x8x4 inputs meets a 3x3 window of 8 outputs. Inserted zeros do not count.
  assert flops.count_flops(conv.apply, variables, x) == 2 * (8 * 8 * 4) * 9 * 8


def test_strided_convolution_gradient_is_twice_forward():
  conv = nn.Conv(8, (3, 3), strides=2, use_bias=False)
  x = jnp.zeros((2, 8, 8, 4))
  variables = conv.init(jax.random.key(0), x)
  forward = flops.count_flops(conv.apply, variables, x)
  both = flops.count_flops(jax.grad(lambda v, x: conv.apply(v, x).sum(), (0, 1)), variables, x)
  # The forward pass, then the input gradient (input-dilated) and the kernel gradient.
  assert both == 3 * forward


def test_scan_counts_every_iteration():
  w = jnp.zeros((6, 6))

  def loop(x):
    return jax.lax.scan(lambda carry, _: (carry @ w, None), x, None, length=5)[0]

  assert flops.count_flops(loop, jnp.zeros((2, 6))) == 5 * 2 * 2 * 6 * 6


def test_while_loop_raises():
  with pytest.raises(ValueError, match="cannot count a while_loop"):
    flops.count_flops(lambda x: jax.lax.while_loop(lambda v: v.sum() < 1, lambda v: v @ v, x),
                      jnp.zeros((2, 2)))  # fmt: skip


def test_resnet20_forward_closed_form():
  model = models.MODELS["resnet20"](10, conv_impl="xla")
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
  counted = flops.count_flops(lambda v, images: model.apply(v, images, train=False), variables, x)
  macs = 32 * 32 * 16 * 9 * 3  # Stem.
  macs += 6 * 32 * 32 * 16 * 9 * 16  # Stage 1: 3 blocks of 2 convolutions.
  macs += 16 * 16 * 32 * 9 * 16 + 5 * 16 * 16 * 32 * 9 * 32 + 16 * 16 * 32 * 16  # Stage 2.
  macs += 8 * 8 * 64 * 9 * 32 + 5 * 8 * 8 * 64 * 9 * 64 + 8 * 8 * 64 * 32  # Stage 3.
  macs += 64 * 10  # Head.
  assert counted == 2 * macs
