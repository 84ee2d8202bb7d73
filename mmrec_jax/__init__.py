"""mmrec_jax: a multimodal (text, image, audio, user) content recommender in JAX/Flax."""

__version__ = "0.1.0"

# Public names imported on first use, so that `import mmrec_jax` stays cheap (no JAX).
_LAZY = {
    "load_exported": "mmrec_jax.exported",
    "load_tables": "mmrec_jax.exported",
    "load_export_config": "mmrec_jax.exported",
    "ExportedRecommender": "mmrec_jax.recommend",
    "item_text_fields": "mmrec_jax.data.text_cache",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmrec_jax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
