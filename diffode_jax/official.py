"""Checkpoints of the official i-DODE code (thu-ml/i-DODE) -> this project's training state.

The official code saves its TrainState with ``clu.checkpoint``: ``checkpoints-0/ckpt-N.flax``
is ``flax.serialization.to_bytes({step, params, ema_params, opt_state})`` (next to
TensorFlow index files that carry nothing the model needs), with ``params`` and
``ema_params`` = ``{"score_model": {...}}`` in the official layer names (``conv_in``,
``dense0``, ``down.block_i/conv1``, ``mid.attn_1/q``, ``up.block_i/nin_shortcut``, ...).
This module reads such a file with ``flax.serialization.msgpack_restore`` (no TensorFlow,
no clu), derives the network layout from the names and shapes alone, checks it against a
config and converts params, EMA params and (when it maps) the Adam state into this
project's ``TrainState``. ``import_checkpoint`` writes the result as a normal workdir.

What the shapes tell (and the config must agree with): channels (``conv_in``), the
embedding width (``dense0``), the depth (how many ``down.block_i``), attention after
every block (``down.attn_i`` / ``up.attn_i``) and in the middle (``mid.attn_1``), the
image channels (``conv_out``), the number of Fourier frequencies (``conv_in``'s input
channels), the conditioning input (``dense0``'s extra input row) and whether the blocks'
time projection has a bias (``cond_proj``). What they cannot tell, so the config decides:
the image size (convolutions and attention do not depend on it), the schedule (VP / SP)
and the parameterization (velocity / eps have the same shapes), gamma_min / gamma_max,
dropout and the bit depth. Every released checkpoint is VP, velocity, 8-bit, with
gamma in [-13.3, 5].
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffode_jax import storage
from diffode_jax.checkpoint import check_shapes
from diffode_jax.errors import CheckpointError, ConfigError
from diffode_jax.networks import switch
from diffode_jax.train_state import TrainState, adam_state_of, make_optimizer, with_adam_state

if TYPE_CHECKING:
  from diffode_jax.model import Components

OFFICIAL_GAMMA_MIN = -13.3  # every official config
OFFICIAL_GAMMA_MAX = 5.0
OFFICIAL_FOURIER_MIN = 6  # Base2FourierFeatures(start=6, ...): frequencies 2^6, 2^7, ...
OFFICIAL_NUM_GROUPS = 32  # flax's GroupNorm default, used by every official GroupNorm

_CKPT_FILE = re.compile(r"ckpt-(\d+)\.flax")

# Official layer name -> this project's (flax auto-named) layer, inside each kind of block.
_TOP = {"dense0": "Dense_0", "dense1": "Dense_1", "conv_in": "Conv_0",
        "GroupNorm_0": "GroupNorm_0", "conv_out": "Conv_1"}
_RESNET = {"GroupNorm_0": "GroupNorm_0", "conv1": "Conv_0", "cond_proj": "Dense_0",
           "GroupNorm_1": "GroupNorm_1", "conv2": "Conv_1", "nin_shortcut": "Dense_1"}
_ATTENTION = {"GroupNorm_0": "GroupNorm_0", "q": "Dense_0", "k": "Dense_1", "v": "Dense_2",
              "proj_out": "Dense_3"}


@dataclasses.dataclass(frozen=True)
class Layout:
  """The network of an official checkpoint, as far as its names and shapes tell."""

  channels: int
  embed_dim: int
  num_blocks: int
  image_channels: int
  num_fourier: int  # Fourier frequencies (0: no Fourier features)
  block_attention: bool
  mid_attention: bool
  time_proj: str  # "zero_no_bias" (official) or "with_bias" (a cond_proj with bias)
  cond_dim: int  # extra inputs of dense0 (1: the official conditioning scalar)


@dataclasses.dataclass(frozen=True)
class Imported:
  """An official checkpoint converted to this project's names."""

  step: int
  params: dict
  ema_params: dict
  adam: dict | None  # {"count", "mu", "nu", "schedule_count"} or None if it did not map
  adam_note: str
  layout: Layout


# ----------------------------------------------------------------------------- reading


def checkpoint_file(path: str) -> str:
  """The ckpt-N.flax file of PATH: the file itself, or the highest N in a directory."""
  if storage.isdir(path):
    found = {int(m.group(1)): name for name in storage.listdir(path)
             if (m := _CKPT_FILE.fullmatch(name))}
    if not found:
      raise CheckpointError(f"{path!r} holds no ckpt-*.flax file: not an official i-DODE "
                            "checkpoint directory (checkpoints-0)")
    return storage.join(path, found[max(found)])
  if not storage.exists(path):
    raise CheckpointError(f"official checkpoint {path!r} does not exist")
  return path


def read(path: str) -> tuple[str, dict]:
  """(file, state dict) of an official checkpoint; CheckpointError if it is not one."""
  file = checkpoint_file(path)
  try:
    data = storage.read_bytes(file)
  except OSError as e:
    raise CheckpointError(f"cannot read official checkpoint {file!r}: "
                          f"{storage.describe(e)}") from None
  try:
    raw = flax.serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several types for a cut or foreign file
    raise CheckpointError(f"{file!r} is not a readable official checkpoint (truncated, or "
                          f"not flax msgpack: {type(e).__name__})") from None
  if not isinstance(raw, dict):
    raise CheckpointError(f"{file!r} is not an official i-DODE checkpoint (no state dict)")
  for key in ("params", "ema_params"):
    tree = raw.get(key)
    if not isinstance(tree, dict) or not isinstance(tree.get("score_model"), dict):
      raise CheckpointError(f"{file!r} is not an official i-DODE checkpoint: it has no "
                            f"{key}/score_model")
  extra = sorted(set(raw["params"]) - {"score_model"})
  if extra:
    raise CheckpointError(f"{file!r} has parameters outside score_model ({', '.join(extra)}), "
                          "e.g. a learned noise schedule, which this project does not support")
  return file, raw


# ----------------------------------------------------------------------------- layout


def _indices(score_model: dict, prefix: str) -> list[int]:
  pattern = re.compile(re.escape(prefix) + r"(\d+)")
  return sorted(int(m.group(1)) for k in score_model if (m := pattern.fullmatch(k)))


def derive_layout(score_model: dict, where: str) -> Layout:
  """The Layout of an official score_model params dict; CheckpointError if it has none."""

  def shape(module, leaf="kernel"):
    node = score_model.get(module)
    if not isinstance(node, dict) or leaf not in node:
      raise CheckpointError(f"{where}: no score_model/{module}/{leaf}; not an official "
                            "i-DODE score model")
    return tuple(np.shape(node[leaf]))

  conv_in, conv_out, dense0 = shape("conv_in"), shape("conv_out"), shape("dense0")
  if len(conv_in) != 4 or len(conv_out) != 4 or len(dense0) != 2:
    raise CheckpointError(f"{where}: conv_in {conv_in}, conv_out {conv_out}, dense0 {dense0} "
                          "are not the shapes of an official i-DODE score model")
  channels, image_channels, inputs = conv_in[3], conv_out[3], conv_in[2]
  num_fourier, rest = divmod(inputs - image_channels, 2 * image_channels)
  if rest or num_fourier < 0:
    raise CheckpointError(f"{where}: conv_in takes {inputs} channels, which is not "
                          f"{image_channels} image channels plus 2 x {image_channels} per "
                          "Fourier frequency")

  down, up = _indices(score_model, "down.block_"), _indices(score_model, "up.block_")
  num_blocks = len(down)
  if down != list(range(num_blocks)) or up != list(range(num_blocks + 1)):
    raise CheckpointError(f"{where}: down.block_0..N-1 and up.block_0..N expected, found "
                          f"down blocks {down} and up blocks {up}")
  down_attn, up_attn = _indices(score_model, "down.attn_"), _indices(score_model, "up.attn_")
  if not down_attn and not up_attn:
    block_attention = False
  elif down_attn == list(range(num_blocks)) and up_attn == list(range(num_blocks + 1)):
    block_attention = True
  else:
    raise CheckpointError(f"{where}: attention after some blocks only (down {down_attn}, up "
                          f"{up_attn}); official models have it after all blocks or none")
  for module in ("mid.block_1", "mid.block_2"):
    if module not in score_model:
      raise CheckpointError(f"{where}: no score_model/{module}; not an official i-DODE "
                            "score model")
  mid_attention = "mid.attn_1" in score_model
  for name in [k for k in score_model if ".attn_" in k]:
    node = score_model[name]
    q = node.get("q", {}).get("kernel") if isinstance(node, dict) else None
    if q is None or np.ndim(q) != 2:
      raise CheckpointError(f"{where}: {name} is not single-head attention (q/kernel "
                            f"{None if q is None else np.shape(q)}); only one head is supported")
  proj = score_model["mid.block_1"].get("cond_proj")
  if not isinstance(proj, dict) or "kernel" not in proj:
    raise CheckpointError(f"{where}: mid.block_1 has no cond_proj; not an official i-DODE "
                          "score model")
  embed_dim = dense0[1]
  return Layout(channels=channels, embed_dim=embed_dim, num_blocks=num_blocks,
                image_channels=image_channels, num_fourier=num_fourier,
                block_attention=block_attention, mid_attention=mid_attention,
                time_proj="with_bias" if "bias" in proj else "zero_no_bias",
                cond_dim=dense0[0] - channels)


def expected_fields(layout: Layout, where: str = "official checkpoint"
                    ) -> list[tuple[str, object, str]]:
  """(config field, value the checkpoint needs, where the value comes from)."""
  L = layout
  cond: list[tuple[str, object, str]]
  if L.cond_dim == 1:
    cond = [("model.cond_input", "scalar", "dense0 takes the time embedding plus one scalar")]
  elif L.cond_dim == 0:
    cond = [("model.cond_input", "onehot", "dense0 takes no conditioning input"),
            ("data.augment", False, "dense0 takes no conditioning input")]
  else:
    raise CheckpointError(f"{where}: dense0 takes {L.channels + L.cond_dim} inputs: "
                          f"{L.channels} of the time embedding and {L.cond_dim} more, which "
                          "is not the official conditioning (one scalar)")
  fields: list[tuple[str, object, str]] = [
      ("model.arch", "unet", "an official score model"),
      ("model.channels", L.channels, "conv_in/kernel"),
      ("model.embed_dim", L.embed_dim, "dense0/kernel"),
      ("model.num_blocks", L.num_blocks, f"{L.num_blocks} down.block_i"),
      ("model.attention", L.mid_attention,
       "mid.attn_1 " + ("present" if L.mid_attention else "absent")),
      ("model.block_attention", L.block_attention,
       "down.attn_i / up.attn_i " + ("present" if L.block_attention else "absent")),
      ("data.channels", L.image_channels, "conv_out/kernel"),
      ("model.fourier_features", L.num_fourier > 0,
       f"conv_in takes {L.num_fourier} Fourier frequencies"),
  ]
  if L.num_fourier:
    fields += [("model.fourier_min", OFFICIAL_FOURIER_MIN, "the official frequencies start "
                f"at 2^{OFFICIAL_FOURIER_MIN}"),
               ("model.fourier_max", OFFICIAL_FOURIER_MIN + L.num_fourier - 1,
                f"conv_in takes {L.num_fourier} Fourier frequencies")]
  fields += cond + [
      ("model.time_proj", L.time_proj,
       "cond_proj " + ("with" if L.time_proj == "with_bias" else "without") + " bias"),
      ("model.time_embedding", "official", "the official sinusoidal time embedding"),
      ("model.num_groups", OFFICIAL_NUM_GROUPS, "the official GroupNorm"),
      ("model.base_measure_skip", True, "the official output adds its input"),
  ]
  return fields


def _config_value(config: ml_collections.ConfigDict, field: str) -> Any:
  section, name = field.split(".")
  if section == "model" and name in ("block_attention", "cond_input", "time_proj",
                                     "time_embedding"):
    return switch(config.model, name)
  return config[section].get(name)


def check_config(config: ml_collections.ConfigDict, layout: Layout, where: str) -> None:
  """ConfigError (one line, every mismatch) unless the finalized config builds layout."""
  bad = []
  for field, want, evidence in expected_fields(layout, where):
    have = _config_value(config, field)
    if have != want or type(have) is not type(want):
      bad.append(f"{field}={have!r} in the config but {want!r} in the checkpoint ({evidence})")
  if bad:
    raise ConfigError(f"official checkpoint {where} does not match the config: "
                      + "; ".join(bad))


# ----------------------------------------------------------------------------- names


def module_names(layout: Layout) -> list[tuple[str, str, dict | None]]:
  """(official module, this project's module, inner name map; None: a plain layer), in
  the order the network runs them."""
  pairs: list[tuple[str, str, dict | None]] = [
      (k, v, None) for k, v in _TOP.items() if k not in ("GroupNorm_0", "conv_out")]
  counts = {"ResnetBlock": 0, "AttentionBlock": 0}

  def add(official, kind):
    names = _RESNET if kind == "ResnetBlock" else _ATTENTION
    pairs.append((official, f"{kind}_{counts[kind]}", names))
    counts[kind] += 1

  for i in range(layout.num_blocks):
    add(f"down.block_{i}", "ResnetBlock")
    if layout.block_attention:
      add(f"down.attn_{i}", "AttentionBlock")
  add("mid.block_1", "ResnetBlock")
  if layout.mid_attention:
    add("mid.attn_1", "AttentionBlock")
  add("mid.block_2", "ResnetBlock")
  for i in range(layout.num_blocks + 1):
    add(f"up.block_{i}", "ResnetBlock")
    if layout.block_attention:
      add(f"up.attn_{i}", "AttentionBlock")
  pairs += [("GroupNorm_0", "GroupNorm_0", None), ("conv_out", "Conv_1", None)]
  return pairs


def _float32(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


def to_native(score_model: dict, layout: Layout, where: str) -> dict:
  """An official score_model dict in this project's parameter names (float32 NumPy)."""
  out, seen = {}, set()
  for official, native, inner in module_names(layout):
    node = score_model.get(official)
    if not isinstance(node, dict):
      raise CheckpointError(f"{where}: no score_model/{official}")
    seen.add(official)
    if inner is None:
      out[native] = _float32(node)
      continue
    unknown = sorted(set(node) - set(inner))
    if unknown:
      raise CheckpointError(f"{where}: unexpected layer(s) {unknown} in score_model/{official}")
    out[native] = {inner[k]: _float32(v) for k, v in node.items()}
  unknown = sorted(set(score_model) - seen)
  if unknown:
    raise CheckpointError(f"{where}: unexpected module(s) {unknown} in score_model")
  return out


# ----------------------------------------------------------------------------- conversion


def convert(raw: dict, config: ml_collections.ConfigDict, where: str) -> Imported:
  """Checks an official state dict against a finalized config and converts it."""
  sm = raw["params"]["score_model"]
  layout = derive_layout(sm, where)
  check_config(config, layout, where)
  params = to_native(sm, layout, where)
  ema = to_native(raw["ema_params"]["score_model"], layout, where + " (ema_params)")
  step = int(np.asarray(raw.get("step", 0)))
  opt_state = raw.get("opt_state")
  found = adam_state_of(opt_state) if isinstance(opt_state, dict) else None
  adam, note = None, "no Adam state (count, mu, nu) in opt_state: a fresh optimizer"
  if found is not None:
    try:
      mu = to_native(found["mu"]["score_model"], layout, where + " (opt_state mu)")
      nu = to_native(found["nu"]["score_model"], layout, where + " (opt_state nu)")
      check_shapes(params, mu, where + " (opt_state mu)")
      check_shapes(params, nu, where + " (opt_state nu)")
      # The official learning rate is a function of the TrainState step (micro-batches).
      adam = {"count": np.asarray(found["count"]), "mu": mu, "nu": nu,
              "schedule_count": np.asarray(step)}
      note = f"Adam moments and count ({int(np.asarray(found['count']))}) carried over"
    except (CheckpointError, KeyError, TypeError) as e:
      note = f"Adam state does not map ({e}): a fresh optimizer"
  return Imported(step, params, ema, adam, note, layout)


def train_state(imported: Imported, config: ml_collections.ConfigDict,
                components: Components) -> TrainState:
  """This project's TrainState of an imported checkpoint under a finalized config."""
  template = jax.eval_shape(components.init_params, jax.random.PRNGKey(0))
  check_shapes(template, imported.params, "official checkpoint")
  params = jax.tree.map(jnp.asarray, imported.params)
  ema = jax.tree.map(jnp.asarray, imported.ema_params)
  optimizer = make_optimizer(config.training)
  opt_state = optimizer.init(params)
  if imported.adam is not None:
    opt_state = with_adam_state(opt_state, imported.adam)
  # Count the official updates as done, so an EMA warm-up of a resumed run does not
  # restart (the official EMA has none).
  opt_state = opt_state._replace(
      gradient_step=jnp.asarray(imported.step, opt_state.gradient_step.dtype))
  return TrainState(step=jnp.asarray(imported.step, jnp.int32), params=params,
                    ema_params=ema, opt_state=opt_state)


def import_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config with the official gamma_min where it is left to be derived, finalized."""
  from diffode_jax.config import finalize_config

  config = copy.deepcopy(config)
  with config.unlocked():
    if config.model.gamma_min is None:
      config.model.gamma_min = OFFICIAL_GAMMA_MIN
  return finalize_config(config)
