"""Run configs: one ml_collections file per recipe, each with a `get_config()`."""
