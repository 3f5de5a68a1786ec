"""Every configuration field, with its meaning. Variants import this and override.

Override any field on the command line, e.g. ``--config.training.batch_size=64``.
Fields left at ``None`` are derived from the others when a run starts (the derived value
is written to the workdir's config.json and to every report).
"""

import ml_collections

# The evaluation and sampling defaults are the library's (one definition).
from diffode_jax import dequantization, likelihood, ode, precision, sampling


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0  # one seed for parameters, data order and every random draw

  config.data = data = ml_collections.ConfigDict()
  data.dataset = "cifar10"  # digits | photo_patches | cifar10 | imagenet32_old | imagenet32_new | image_folder | tfds
  data.image_size = 32  # height of the images (and width, unless image_width is set)
  data.image_width = ml_collections.config_dict.placeholder(int)  # None: square images
  data.channels = 3  # channels per pixel
  data.num_levels = 256  # V: integer levels per channel (256 for 8-bit images)
  data.tfds_data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir, local or gs:// (None: tfds default)
  data.tfds_name = ml_collections.config_dict.placeholder(str)  # dataset=tfds: e.g. mnist, svhn_cropped
  data.tfds_train_split = "train"  # dataset=tfds: any tfds split string, e.g. train[:90%]
  data.tfds_test_split = "test"  # dataset=tfds: the split eval_bpd reads
  data.tfds_image_key = "image"  # dataset=tfds: the image feature
  data.folder = ml_collections.config_dict.placeholder(str)  # image_folder (local or gs://): train/ + test/, or a pool
  data.holdout_fraction = 0.0  # image_folder pool: fraction of the files held out as test
  data.reduce_bits = False  # folders and tfds, V < 2^b: b-bit p -> floor(p V / 2^b); False: data holds k < V
  data.manual_dir = ml_collections.config_dict.placeholder(str)  # imagenet32_new: dir of the 2 zips
  data.augment = False  # random flips / quarter turns; the network is told which (conditioning)

  config.model = model = ml_collections.ConfigDict()
  # unet | oracle (closed-form velocity of the training set, docs/design.md, The oracle)
  model.arch = "unet"
  model.schedule = "VP"  # VP | SP
  model.parameterization = "velocity"  # velocity | eps
  model.gamma_min = ml_collections.config_dict.placeholder(float)  # None: -2 log(3 V), -13.28 for 8-bit
  model.gamma_max = 5.0  # noise end of the schedule
  model.channels = 128  # U-Net width
  model.num_blocks = 32  # ResNet blocks on the down path (the up path has one more)
  model.embed_dim = 512  # width of the time-embedding MLP
  model.attention = True  # single-head self-attention in the middle block
  model.block_attention = False  # also after every down and up ResNet block (official cifar10_aug)
  model.cond_input = "onehot"  # onehot: augmentation one-hot added to the time embedding | scalar: official, a flag concatenated before the first dense layer
  model.time_proj = "with_bias"  # ResNet blocks' time projection: with_bias | zero_no_bias (official)
  model.time_embedding = "native"  # native | official: floating-point order of the sinusoidal frequencies
  model.dropout = 0.1  # dropout rate inside the ResNet blocks
  model.num_groups = 32  # GroupNorm groups (gcd with the channel count is used); keep at
  # least 2 channels per group, or GroupNorm removes the time input (training refuses)
  model.fourier_features = True  # append Fourier features of the input
  model.fourier_min = ml_collections.config_dict.placeholder(int)  # lowest exponent n of 2^n * 2 pi; None: fourier_max - 1
  model.fourier_max = ml_collections.config_dict.placeholder(int)  # highest; None: ceil(log2 V) - 1, the coarsest whose period fits in a bin (7 for 8-bit)
  model.base_measure_skip = True  # output += input (VDM); parity with the official code
  model.second_order = False  # add the second-order flow-matching loss (fine-tuning)
  model.second_order_weight = 0.1  # lambda of the second-order loss
  model.remat = False  # recompute each ResNet block in the backward pass (less memory, ~1/3 more compute)

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # global batch (split over all devices and hosts)
  training.num_steps = 6_000_000  # optimizer updates in total
  training.learning_rate = 2e-4  # peak learning rate
  training.warmup_steps = 100  # linear warm-up from 0
  training.b1 = 0.9  # AdamW beta1
  training.b2 = 0.99  # AdamW beta2
  training.eps = 1e-8  # AdamW epsilon
  training.weight_decay = 0.01  # AdamW decoupled weight decay, on the parameters weight_decay_mask names
  training.weight_decay_mask = "kernels"  # kernels (not biases / norm scales) | all_but_biases (official: GroupNorm scales decayed)
  training.grad_clip = 1.0  # clip the global gradient norm (0: off; the reference configs: 0, as the official code)
  training.ema_decay = 0.9999  # EMA of parameters used for evaluation
  training.ema_warmup = True  # decay min(ema_decay, (1 + n) / (10 + n)) after n updates
  training.grad_accum_steps = 1  # micro-batches per update (optax.MultiSteps)
  training.importance_sampling = True  # gamma ~ alpha^2 (velocity only)
  training.antithetic_time = True  # stratified time draws across the batch
  training.dequantization = "none"  # none | u | tn (data fed to the forward diffusion)
  training.log_every = 100  # steps between metrics.jsonl / TensorBoard rows
  training.tensorboard = True  # also write TensorBoard events (imports TensorFlow, ~5 s)
  training.checkpoint_every = 5000  # steps between checkpoints
  training.keep_checkpoints = 3  # newest checkpoints kept on disk (plus the one with the lowest training loss)
  training.divergence_factor = 10.0  # stop when a logged loss exceeds this times the median of the last 20 (0: off; run/guard.py)
  training.init_from = ml_collections.config_dict.placeholder(str)  # workdir or checkpoint dir to start a new run from (None: none)
  training.init_from_optimizer = False  # init_from also carries the Adam moments and count (official fine-tune)
  training.eval_every = 0  # steps between test bits/dim of the EMA params (eval.split, K = 1, eval's keys) in metrics.jsonl (0: off)
  training.eval_images = 128  # first images of eval.split used by those evaluations
  training.precision = precision.DEFAULT_TRAIN_PRECISION  # matmul/conv precision of the train step: default (XLA's choice: TF32 on A100/H100, 1 bf16 pass on TPU) | high | highest

  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.split = "test"  # which split eval_bpd evaluates
  evaluation.dequantization = dequantization.DEFAULT_EVAL_DEQUANTIZATION  # tn | v | u
  evaluation.num_importance = 1  # K samples of the importance-weighted bound
  evaluation.analytic_entropy = False  # tn with K = 1: use the entropy of q instead of -log q
  evaluation.divergence = ode.DEFAULT_DIVERGENCE  # rademacher | gaussian | exact
  evaluation.solver = likelihood.DEFAULT_EVAL_SOLVER.solver  # dopri5 | tsit5 | bosh3 | dopri8 (diffrax, on device) | scipy_rk45 (the official host loop); docs/evaluation.md, Solver and tolerance
  evaluation.rtol = likelihood.DEFAULT_EVAL_SOLVER.rtol  # relative tolerance of the adaptive solver (1e-5)
  evaluation.atol = likelihood.DEFAULT_EVAL_SOLVER.atol  # absolute tolerance (1e-5)
  evaluation.max_steps = ode.DEFAULT_MAX_STEPS  # solver steps before it gives up (reported as an error)
  evaluation.norm = ode.DEFAULT_NORM  # error norm of the step-size control: rms (whole batch) | image_max | leaf_max | image_leaf_max (ode.error_norm)
  evaluation.time = ode.DEFAULT_TIME  # variable the ODE is integrated in: gamma | sigma | angle | rho7 (ode.TIME_VARIABLES; same solution, other steps)
  evaluation.batch_size = 128  # images per ODE solve
  evaluation.num_images = ml_collections.config_dict.placeholder(int)  # None: the whole split
  evaluation.gamma_u = ml_collections.config_dict.placeholder(float)  # u start; None: schedules.default_gamma_u(V) = -11.8 + 2 log(256/V)
  evaluation.precision = precision.DEFAULT_EVAL_PRECISION  # matmul/conv precision of the likelihood ODE, its divergence and sampling: highest (full float32) | high | default
  evaluation.reproducibility_check = True  # eval_bpd solves batch 0 again from z0 moved by 1e-7 and reports (warns above 0.01 bits/dim) how far each bound moves (docs/evaluation.md)
  evaluation.exact_trace_chunk = ml_collections.config_dict.placeholder(int)  # divergence=exact: basis tangents per pass (memory ~ chunk); None: all D at once

  config.sample = sample = ml_collections.ConfigDict()
  sample.num_samples = 64  # images drawn by --mode=sample
  sample.batch_size = 64  # images per ODE solve
  sample.decode = sampling.DEFAULT_DECODE  # argmax (decoder mode) | sample (decoder draw) | round (nearest bin)
  sample.solver = sampling.DEFAULT_SAMPLE_SOLVER.solver  # dopri5 | tsit5 | bosh3 | dopri8 (diffrax, on device)
  sample.rtol = sampling.DEFAULT_SAMPLE_SOLVER.rtol  # relative tolerance of the sampling ODE (1e-5)
  sample.atol = sampling.DEFAULT_SAMPLE_SOLVER.atol  # absolute tolerance (1e-5)
  sample.max_steps = ode.DEFAULT_MAX_STEPS  # solver steps before sampling gives up (reported as an error)
  sample.norm = ode.DEFAULT_NORM  # error norm of the sampling solve (as eval.norm)
  sample.time = ode.DEFAULT_TIME  # time variable of the sampling solve (as eval.time)
  return config
