"""Backbone networks: (x, gamma) -> raw output, with no diffusion math inside."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffode_jax.errors import ConfigError, warn
from diffode_jax.networks.unet import (COND_INPUTS, TIME_EMBEDDINGS, TIME_PROJS, UNet,
                                       time_blind_reason)

if TYPE_CHECKING:
  import ml_collections

# Layout switches added after the first release: configs saved before them lack the
# fields, and get the layout they were trained with.
SWITCH_DEFAULTS = {"block_attention": False, "cond_input": "onehot", "time_proj": "with_bias",
                   "time_embedding": "native"}


def switch(config_model: ml_collections.ConfigDict, name: str) -> Any:
  """A layout switch of config.model, with its default for configs that predate it."""
  return config_model.get(name, SWITCH_DEFAULTS[name])


def check_network_config(config_model: ml_collections.ConfigDict) -> None:
  """Raises ValueError for a layout switch of config.model that does not exist."""
  for name, choices in (("cond_input", COND_INPUTS), ("time_proj", TIME_PROJS),
                        ("time_embedding", TIME_EMBEDDINGS)):
    value = switch(config_model, name)
    if value not in choices:
      raise ValueError(f"unknown model.{name} {value!r}; expected one of {choices}")
  if not isinstance(switch(config_model, "block_attention"), bool):
    raise ValueError(f"model.block_attention must be True or False, got "
                     f"{switch(config_model, 'block_attention')!r}")


def check_sees_time(config_model: ml_collections.ConfigDict, *, from_scratch: bool) -> None:
  """Refuses to train a U-Net from scratch that cannot see the noise level.

  ``from_scratch``: a new network is about to be initialized and trained, so a blind layout
  is a ConfigError (one line naming model.channels, model.num_groups and a layout that
  works). Where the layout is fixed by an existing checkpoint (a resumed run, a fine-tune
  from ``training.init_from``, an imported official checkpoint, evaluation, sampling,
  ``dj.load``) the network is used as it is, with a one-line warning on stderr: the
  official code builds such networks at small widths, and their checkpoints must still
  load. Other architectures (the closed-form oracle) have no network to check.
  """
  if config_model.arch != "unet":
    return
  reason = time_blind_reason(config_model.channels, config_model.num_groups)
  if reason is None:
    return
  if from_scratch:
    raise ConfigError(reason)
  lacks = reason.rsplit("; ", 1)[0]
  warn(f"{lacks}; the checkpoint fixes this layout, so it is used as it is")


def make_network(config: ml_collections.ConfigDict) -> UNet:
  """Builds the U-Net described by ``config.model`` (see configs/default.py)."""
  m = config.model
  if m.arch != "unet":
    raise ValueError(f"make_network builds the 'unet' architecture, not {m.arch!r}")
  return UNet(
      channels=m.channels,
      num_blocks=m.num_blocks,
      embed_dim=m.embed_dim,
      attention=m.attention,
      block_attention=switch(m, "block_attention"),
      cond_input=switch(m, "cond_input"),
      time_proj=switch(m, "time_proj"),
      time_embedding=switch(m, "time_embedding"),
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
