"""Backbone networks: (x, gamma) -> raw output, with no diffusion math inside."""

from diffode_jax.networks.unet import UNet


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
      dropout=m.dropout,
      num_groups=m.num_groups,
      fourier_min=m.fourier_min,
      fourier_max=m.fourier_max,
      fourier=m.fourier_features,
      base_measure_skip=m.base_measure_skip,
      gamma_min=m.gamma_min,
      gamma_max=m.gamma_max,
  )
