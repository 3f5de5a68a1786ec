"""Backbone networks: (x, gamma) -> raw output, with no diffusion math inside."""

from diffode_jax.networks.unet import COND_INPUTS, TIME_EMBEDDINGS, TIME_PROJS, UNet

# Layout switches added after the first release: configs saved before them lack the
# fields, and get the layout they were trained with.
LAYOUT_DEFAULTS = {"block_attention": False, "cond_input": "onehot", "time_proj": "dense",
                   "time_embedding": "native"}


def layout(config_model, name: str):
  """A layout switch of config.model, with its default for configs that predate it."""
  return config_model.get(name, LAYOUT_DEFAULTS[name])


def check_network_config(config_model) -> None:
  """Raises ValueError for a layout switch of config.model that does not exist."""
  for name, choices in (("cond_input", COND_INPUTS), ("time_proj", TIME_PROJS),
                        ("time_embedding", TIME_EMBEDDINGS)):
    value = layout(config_model, name)
    if value not in choices:
      raise ValueError(f"unknown model.{name} {value!r}; expected one of {choices}")
  if not isinstance(layout(config_model, "block_attention"), bool):
    raise ValueError(f"model.block_attention must be True or False, got "
                     f"{layout(config_model, 'block_attention')!r}")


def make_network(config) -> UNet:
  """Builds the U-Net described by ``config.model`` (see configs/default.py)."""
  m = config.model
  if m.arch != "unet":
    raise ValueError(f"make_network builds the 'unet' architecture, not {m.arch!r}")
  return UNet(
      channels=m.channels,
      num_blocks=m.num_blocks,
      embed_dim=m.embed_dim,
      attention=m.attention,
      block_attention=layout(m, "block_attention"),
      cond_input=layout(m, "cond_input"),
      time_proj=layout(m, "time_proj"),
      time_embedding=layout(m, "time_embedding"),
      dropout=m.dropout,
      num_groups=m.num_groups,
      fourier_min=m.fourier_min,
      fourier_max=m.fourier_max,
      fourier=m.fourier_features,
      base_measure_skip=m.base_measure_skip,
      gamma_min=m.gamma_min,
      gamma_max=m.gamma_max,
      remat=bool(m.remat),
  )
