"""Test-only inverse of the importer (``diffode_jax/official.py``): this project's params
written back in the official i-DODE names, to make official-format files from this
project's own networks."""

from __future__ import annotations

from diffode_jax.networks import switch
from diffode_jax.official import Layout, module_names


def to_official(native: dict, layout: Layout) -> dict:
  """The inverse of ``to_native``: this project's params in official names."""
  out = {}
  for official, name, inner in module_names(layout):
    node = native[name]
    if inner is None:
      out[official] = node
    else:
      back = {v: k for k, v in inner.items()}
      out[official] = {back[k]: v for k, v in node.items()}
  return out


def layout_of_config(config) -> Layout:
  """The Layout a finalized config builds (for writing official-format files)."""
  m = config.model
  n = m.fourier_max - m.fourier_min + 1 if m.fourier_features else 0
  return Layout(channels=m.channels, embed_dim=m.embed_dim, num_blocks=m.num_blocks,
                image_channels=config.data.channels, num_fourier=n,
                block_attention=switch(m, "block_attention"),
                mid_attention=bool(m.attention), time_proj=switch(m, "time_proj"),
                cond_dim=1 if switch(m, "cond_input") == "scalar" else 0)
