"""Tools around training: fetching and preparing the demo's model and data (python -m orpo_ds.tools.assets)."""
