"""mmrec_jax: a multimodal (text, image, audio, user) content recommender in JAX/Flax."""

__version__ = "0.1.0"
