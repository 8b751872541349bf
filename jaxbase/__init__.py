"""jaxbase: JAX/Flax baselines and the levers that improve them."""
