"""Typed run configuration: one dataclass per section, each field documented, validated in ``__post_init__``.

Every field carries its documentation in ``metadata["doc"]`` (``python -m dist_hrnas.train --help-config``
prints them). Loading YAML and ``section.key=value`` overrides lives in :mod:`dist_hrnas.config.loading`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from dist_hrnas.config.checks import at_least, between, choice, each_at_least, finite, positive
from dist_hrnas.config.checks import documented as _f
from dist_hrnas.config.latency_schema import CHANNELS_LAST_DEFAULT, LatencyConfig
from dist_hrnas.errors import ConfigError


@dataclass
class ModelConfig:
    """The HR-NAS supernet (names follow HR-NAS's ``model_kwparams``), or a searched architecture file."""

    arch: str = _f("", "Architecture file (e.g. RUN_DIR/searched_arch.yaml) to build instead of the supernet; "
                       "its contents replace every other model key.")
    num_classes: int = _f(10, "Classifier outputs; must match the data set's class count.")
    image_channels: int = _f(3, "Channels of the input image (1 for the grayscale digits).")
    input_stride: int = _f(4, "Stem downsampling: 4 = two stride-2 3x3 convs (HR-NAS), 2 = one.")
    input_channel: list[int] = _f([24, 24], "Output channels of the two stem convs.")
    stages: list = _f([[1, [1], [24]], [2, [2, 2], [18, 36]]],
                      "HR-NAS inverted_residual_setting: one [branches, [blocks per branch], "
                      "[channels per branch]] per stage; each stage is a fuse module then a parallel module.")
    kernel_sizes: list[int] = _f([3, 5, 7], "Depthwise kernel size of each branch of every atomic block.")
    expand_ratio: float = _f(4.0, "Initial hidden width of every branch = round(C_in * expand_ratio); "
                                  "1 = no expand conv.")
    head_channels: list[int] = _f([36, 72], "Per-resolution channels of the head's increase blocks.")
    last_channel: int = _f(256, "Channels of the head's final 1x1 conv (the classifier's input).")
    active_fn: str = _f("relu", "Activation: relu, relu6, swish or hswish.")
    bn_momentum: float = _f(0.01, "BatchNorm momentum (PyTorch convention).")
    bn_eps: float = _f(1e-3, "BatchNorm epsilon.")
    dropout: float = _f(0.2, "Dropout before the classifier.")

    def __post_init__(self) -> None:
        finite(self, "model")
        choice("model", "active_fn", self.active_fn, ("relu", "relu6", "swish", "hswish"))
        choice("model", "input_stride", str(self.input_stride), ("2", "4"))
        at_least("model", "num_classes", self.num_classes, 2)
        at_least("model", "image_channels", self.image_channels, 1)
        if len(self.input_channel) != 2:
            raise ConfigError(f"model.input_channel: expected 2 stem widths, got {self.input_channel}")
        each_at_least("model", "input_channel", self.input_channel, 1)
        self._check_stages()
        if not self.kernel_sizes:
            raise ConfigError("model.kernel_sizes: give at least one kernel size, e.g. [3, 5, 7]")
        for i, k in enumerate(self.kernel_sizes):
            if k < 1 or k % 2 == 0:
                raise ConfigError(f"model.kernel_sizes[{i}]: must be an odd integer >= 1 (3, 5, 7, ...), got {k}")
        if len(self.head_channels) != self.stages[-1][0]:
            raise ConfigError(f"model.head_channels: need one width per final branch "
                              f"({self.stages[-1][0]}), got {self.head_channels}")
        each_at_least("model", "head_channels", self.head_channels, 1)
        at_least("model", "last_channel", self.last_channel, 1)
        positive("model", "expand_ratio", self.expand_ratio)
        between("model", "bn_momentum", self.bn_momentum, 0.0, 1.0, high_open=False)
        positive("model", "bn_eps", self.bn_eps)
        between("model", "dropout", self.dropout, 0.0, 1.0)

    def _check_stages(self) -> None:
        if not self.stages:
            raise ConfigError("model.stages: give at least one stage [branches, [blocks per branch], "
                              "[channels per branch]], e.g. [[1, [1], [24]]]")
        for i, stage in enumerate(self.stages):
            ok = (isinstance(stage, list) and len(stage) == 3 and isinstance(stage[0], int)
                  and not isinstance(stage[0], bool) and stage[0] >= 1
                  and isinstance(stage[1], list) and isinstance(stage[2], list)
                  and len(stage[1]) == stage[0] == len(stage[2]))
            if not ok:
                raise ConfigError(f"model.stages[{i}]: expected [branches >= 1, [blocks per branch], "
                                  f"[channels per branch]] with matching lengths, got {stage}")
            each_at_least("model", f"stages[{i}][1] (blocks per branch)", stage[1], 0)
            each_at_least("model", f"stages[{i}][2] (channels per branch)", stage[2], 1)

    @property
    def min_image_size(self) -> int:
        """The smallest input whose lowest-resolution branch still has one pixel per stride step."""
        return self.input_stride * 2 ** (max(stage[0] for stage in self.stages) - 1)


@dataclass
class DataConfig:
    """Where the images come from."""

    name: str = _f("digits", "digits (scikit-learn's bundled handwritten digits), synthetic or imagefolder.")
    root: str = _f("", "imagefolder: directory holding train/ and val/ class folders.")
    image_size: int = _f(32, "Square side the images are resized/cropped to (the network's input size).")
    val_fraction: float = _f(0.2, "digits: share of the 1797 images held out for validation.")
    split_seed: int = _f(0, "digits: seed of the fixed train/val permutation.")
    synthetic_train_size: int = _f(512, "synthetic: number of training samples.")
    synthetic_val_size: int = _f(128, "synthetic: number of validation samples.")
    synthetic_classes: int = _f(10, "synthetic: number of classes.")
    synthetic_channels: int = _f(3, "synthetic: image channels.")
    num_workers: int = _f(0, "DataLoader worker processes per rank.")
    augment: bool = _f(True, "imagefolder: random-resized-crop + horizontal flip on the training split.")

    def __post_init__(self) -> None:
        finite(self, "data")
        choice("data", "name", self.name, ("digits", "synthetic", "imagefolder"))
        positive("data", "image_size", self.image_size)
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction: must be in (0, 1), got {self.val_fraction}")
        positive("data", "split_seed", self.split_seed, allow_zero=True)
        positive("data", "synthetic_train_size", self.synthetic_train_size)
        positive("data", "synthetic_val_size", self.synthetic_val_size)
        at_least("data", "synthetic_classes", self.synthetic_classes, 2)
        positive("data", "synthetic_channels", self.synthetic_channels)
        positive("data", "num_workers", self.num_workers, allow_zero=True)


@dataclass
class TrainConfig:
    """Optimisation and the training loop."""

    epochs: int = _f(4, "Training epochs.")
    batch_size_per_rank: int = _f(64, "Images per step on each rank (global batch = this x world size).")
    optimizer: str = _f("sgd", "sgd, rmsprop or adamw.")
    lr: float = _f(0.1, "Peak learning rate for a global batch of lr_base_batch images.")
    lr_base_batch: int = _f(0, "Global batch that lr is given for; lr is scaled linearly to the real global "
                               "batch. 0 = use lr as is.")
    lr_schedule: str = _f("cosine", "cosine, exp (HR-NAS: x exp_gamma every exp_decay_epochs) or constant.")
    warmup_epochs: float = _f(0.0, "Linear learning-rate warm-up from 0, in epochs (stepwise).")
    exp_gamma: float = _f(0.97, "exp schedule: decay factor.")
    exp_decay_epochs: float = _f(2.4, "exp schedule: epochs between decays.")
    momentum: float = _f(0.9, "SGD/RMSprop momentum.")
    nesterov: bool = _f(True, "SGD: Nesterov momentum.")
    rmsprop_alpha: float = _f(0.9, "RMSprop smoothing constant.")
    rmsprop_eps: float = _f(1e-3, "RMSprop epsilon.")
    adamw_betas: list[float] = _f([0.9, 0.999], "AdamW betas.")
    weight_decay: float = _f(4e-5, "Weight decay on conv/linear weights (not on BN or biases).")
    label_smoothing: float = _f(0.1, "Cross-entropy label smoothing.")
    ema_decay: float = _f(0.0, "EMA of weights (0 = off). Validation uses the EMA weights when on.")
    eval_every: int = _f(1, "Validate every N epochs (and always after the last).")
    log_every: int = _f(10, "Log training scalars every N steps.")
    max_steps_per_epoch: int = _f(0, "Cut every epoch after N steps (0 = whole epoch); for smoke tests.")
    seed: int = _f(0, "Seed of weights init, data order and dropout.")
    grad_accum_steps: int = _f(1, "Split each rank's batch into N micro-batches, communicating gradients once.")
    bf16: bool = _f(True, "bf16 autocast on CUDA (ignored on CPU).")
    eval_bn_calibration_steps: int = _f(0, "Re-estimate BN statistics on N training batches before each "
                                                "validation (0 = use the running statistics as they are). Strong "
                                                "penalties change the scales faster than running averages follow.")
    grad_clip_norm: float = _f(0.0, "Clip the global gradient norm to this value before each update (0 = off); "
                                    "also DeepSpeed's gradient_clipping.")
    channels_last: bool = _f(CHANNELS_LAST_DEFAULT, "Model and every batch in torch.channels_last (NHWC) on CPU and GPU: oneDNN's "
                                   "and cuDNN's convolutions run fastest in it (bench/overhead.py measures the "
                                   "step in both formats). Under DeepSpeed ZeRO 1/2 the parameters live in its "
                                   "flat NCHW buffers (the batches, hence the activations, stay channels_last).")

    def __post_init__(self) -> None:
        finite(self, "train")
        choice("train", "optimizer", self.optimizer, ("sgd", "rmsprop", "adamw"))
        choice("train", "lr_schedule", self.lr_schedule, ("cosine", "exp", "constant"))
        positive("train", "epochs", self.epochs)
        positive("train", "batch_size_per_rank", self.batch_size_per_rank)
        positive("train", "lr", self.lr)
        positive("train", "lr_base_batch", self.lr_base_batch, allow_zero=True)
        positive("train", "warmup_epochs", self.warmup_epochs, allow_zero=True)
        between("train", "exp_gamma", self.exp_gamma, 0.0, 1.0, high_open=False, low_open=True)
        positive("train", "exp_decay_epochs", self.exp_decay_epochs)
        between("train", "momentum", self.momentum, 0.0, 1.0)
        between("train", "rmsprop_alpha", self.rmsprop_alpha, 0.0, 1.0)
        positive("train", "rmsprop_eps", self.rmsprop_eps)
        if len(self.adamw_betas) != 2:
            raise ConfigError(f"train.adamw_betas: expected two betas [beta1, beta2], got {self.adamw_betas}")
        for i, beta in enumerate(self.adamw_betas):
            between("train", f"adamw_betas[{i}]", beta, 0.0, 1.0)
        positive("train", "weight_decay", self.weight_decay, allow_zero=True)
        between("train", "label_smoothing", self.label_smoothing, 0.0, 1.0)
        positive("train", "max_steps_per_epoch", self.max_steps_per_epoch, allow_zero=True)
        positive("train", "seed", self.seed, allow_zero=True)
        positive("train", "eval_every", self.eval_every)
        positive("train", "log_every", self.log_every)
        positive("train", "grad_accum_steps", self.grad_accum_steps)
        positive("train", "eval_bn_calibration_steps", self.eval_bn_calibration_steps, allow_zero=True)
        if self.grad_clip_norm < 0:
            raise ConfigError(f"train.grad_clip_norm: must be >= 0 (0 = off), got {self.grad_clip_norm}")
        if self.batch_size_per_rank % self.grad_accum_steps:
            raise ConfigError(f"train.grad_accum_steps ({self.grad_accum_steps}) must divide "
                              f"train.batch_size_per_rank ({self.batch_size_per_rank})")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay: must be in [0, 1), got {self.ema_decay}")


@dataclass
class PruneConfig:
    """The HR-NAS search: L1 on depthwise-BN scales weighted by a per-channel cost, and shrinking."""

    penalty: str = _f("seconds", "Per-channel cost: seconds (measured on latency.device), macs (HR-NAS), "
                                 "equal (network slimming) or none (plain training / retraining).")
    rho: float = _f(1.8e-4, "Weight of the L1 term after warm-up.")
    epoch_free: float = _f(0.0, "Epochs without penalty at the start (rho = 0).")
    epoch_warmup: float = _f(0.0, "Epoch by which rho has risen linearly from 0 (at epoch_free) to prune.rho.")
    stepwise: bool = _f(True, "Raise rho every step (true) or once per epoch (false).")
    threshold: float = _f(1e-3, "A channel is dead when its depthwise-BN |scale| is at or below this.")
    shrink_delta_seconds: float = _f(0.0, "Shrink (physically remove dead channels) after an evaluation once "
                                          "the dead channels' predicted seconds reach this (and are > 0); the "
                                          "last epoch always shrinks.")
    skip_expand1: bool = _f(True, "Never prune the first block without an expand conv (HR-NAS's "
                                  "expansion_only_skip_expand1).")
    bn_calibration_steps: int = _f(10, "Training batches used to re-estimate BN statistics after a shrink "
                                       "(0 = keep the folded statistics).")
    measure_before_cut: bool = _f(True, "Time every shrink's candidate end to end against the network now, in "
                                        "the same rounds, before any rank cuts (refused or re-fitted when not "
                                        "faster); false = the calibrated latency model decides (no candidate "
                                        "is timed: cheaper, less exact). Always false with latency.lut_device.")
    measure_share: float = _f(0.05, "Without a budget, before the last epoch a shrink's candidates are timed only "
                                    "while the search has spent at most this share of its wall time since its "
                                    "start timing candidates; otherwise the shrink waits for a later evaluation "
                                    "(the penalty goes on; prune/shrink_refused = 5). The last epoch, and every "
                                    "shrink of a budget search (it follows the plan), are always timed; past the "
                                    "share (no budget) each candidate is compared once, without retakes. 1 = no "
                                    "limit; 0 = time at the last epoch only.")
    round_to: int | str = _f("auto", "Keep every shrinking branch's surviving width a multiple of N (the channels "
                                     "with the largest |scale| survive; a branch may still go to 0); 1 = off; auto = "
                                     "each branch's own channel grid, read from its latency curve on the target "
                                     "(the width step at which its cost jumps).")
    target_latency_ms: float | None = _f(None, "Latency budget in ms on latency.device at latency.batch_size: the "
                                               "search ends with a network measured at or just under it "
                                               "(rho is then steered, prune.rho is its starting value).")
    target_ratio: float | None = _f(None, "Latency budget as a fraction of the supernet's measured latency "
                                          "(e.g. 0.5); instead of target_latency_ms.")
    schedule: str = _f("linear", "Shape of the planned pruned-seconds curve with a budget: linear, cosine or exp "
                                 "(front-loaded).")
    epoch_target: float = _f(0.0, "Epoch by which the plan reaches the budget (0 = three quarters of "
                                  "train.epochs).")
    budget_tolerance: float = _f(0.05, "With a budget, never shrink more than this fraction below the target "
                                       "(dead channels are revived instead).")
    controller_kp: float = _f(10.0, "Budget controller: proportional gain on (planned - actual pruned seconds) / "
                                    "budget, in log-rho.")
    controller_ki: float = _f(20.0, "Budget controller: integral gain (per epoch), in log-rho.")
    rho_max_factor: float = _f(10.0, "Budget controller: rho stays within [rho / f, rho * f].")

    def __post_init__(self) -> None:
        finite(self, "prune")
        choice("prune", "penalty", self.penalty, ("seconds", "macs", "equal", "none"))
        choice("prune", "schedule", self.schedule, ("linear", "cosine", "exp"))
        if self.target_latency_ms is not None and self.target_ratio is not None:
            raise ConfigError("prune.target_latency_ms and prune.target_ratio are both set: give one budget")
        if self.target_latency_ms is not None and self.target_latency_ms <= 0:
            raise ConfigError(f"prune.target_latency_ms: must be > 0 ms, got {self.target_latency_ms}")
        if self.target_ratio is not None and not 0 < self.target_ratio < 1:
            raise ConfigError(f"prune.target_ratio: must be between 0 and 1 (a fraction of the supernet's "
                              f"latency), got {self.target_ratio}")
        if self.has_budget and self.penalty == "none":
            raise ConfigError("a latency budget (prune.target_latency_ms / target_ratio) needs a search: set "
                              "prune.penalty to seconds, macs or equal")
        if self.has_budget and self.rho <= 0:
            raise ConfigError("prune.rho: must be > 0 with a latency budget (it is the controller's starting value)")
        if not 0 <= self.budget_tolerance < 1:
            raise ConfigError(f"prune.budget_tolerance: must be in [0, 1), got {self.budget_tolerance}")
        positive("prune", "epoch_target", self.epoch_target, allow_zero=True)
        if not 0 <= self.measure_share <= 1:
            raise ConfigError(f"prune.measure_share: must be in [0, 1] (a share of the search's wall time), "
                              f"got {self.measure_share}")
        positive("prune", "controller_kp", self.controller_kp, allow_zero=True)
        positive("prune", "controller_ki", self.controller_ki, allow_zero=True)
        if self.rho_max_factor < 1:
            raise ConfigError(f"prune.rho_max_factor: must be >= 1, got {self.rho_max_factor}")
        positive("prune", "rho", self.rho, allow_zero=True)
        positive("prune", "epoch_free", self.epoch_free, allow_zero=True)
        positive("prune", "epoch_warmup", self.epoch_warmup, allow_zero=True)
        positive("prune", "threshold", self.threshold, allow_zero=True)
        positive("prune", "shrink_delta_seconds", self.shrink_delta_seconds, allow_zero=True)
        positive("prune", "bn_calibration_steps", self.bn_calibration_steps, allow_zero=True)
        if self.round_to != "auto" and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise ConfigError(f"prune.round_to: must be auto or an integer >= 1, got {self.round_to!r}")
        if self.epoch_warmup and self.epoch_warmup < self.epoch_free:
            raise ConfigError(f"prune.epoch_warmup ({self.epoch_warmup}) must be 0 or >= prune.epoch_free "
                              f"({self.epoch_free})")

    @property
    def has_budget(self) -> bool:
        return self.target_latency_ms is not None or self.target_ratio is not None


@dataclass
class DistConfig:
    """Process group and data-parallel engine (used under torchrun)."""

    backend: str = _f("auto", "auto (nccl on CUDA, gloo on CPU), nccl or gloo.")
    engine: str = _f("ddp", "ddp (DistributedDataParallel) or deepspeed.")
    timeout_s: int = _f(300, "Collective timeout: a lost rank ends the job with an error after this long.")
    deepspeed: dict = _f({}, "DeepSpeed settings ({zero_stage: 0|1|2, ...}) or {config: path/to/ds.json}.")
    always_group: bool = _f(False, "Under torchrun with a single process, still create the process group and "
                                   "the dist.engine (DDP or DeepSpeed) instead of training the bare module: one GPU "
                                   "then runs the multi-GPU code path, nccl included (bench/gpu_check.py).")

    def __post_init__(self) -> None:
        choice("dist", "backend", self.backend, ("auto", "nccl", "gloo"))
        choice("dist", "engine", self.engine, ("ddp", "deepspeed"))
        positive("dist", "timeout_s", self.timeout_s)


@dataclass
class LogConfig:
    """Run directory, TensorBoard and console output."""

    run_dir: str = _f("", "Run directory (default runs/<config file name>).")
    tensorboard: bool = _f(True, "Write TensorBoard events under <run_dir>/tb/.")
    progress: bool = _f(True, "Show tqdm progress bars (rank 0 only).")

    def __post_init__(self) -> None:
        if "\n" in self.run_dir or "\x00" in self.run_dir:
            raise ConfigError(f"log.run_dir: {self.run_dir!r} is not a usable directory name")


@dataclass
class CheckpointConfig:
    """Checkpoints under <run_dir>/checkpoints/."""

    every_epochs: int = _f(1, "Write checkpoints/last.pt every N epochs (0 = never).")
    resume: str = _f("auto", "auto (resume from checkpoints/last.pt if present) or never.")

    def __post_init__(self) -> None:
        choice("checkpoint", "resume", self.resume, ("auto", "never"))
        positive("checkpoint", "every_epochs", self.every_epochs, allow_zero=True)


@dataclass
class Config:
    """The whole run configuration, one dataclass per section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    name: str = field(default="default", metadata={"doc": "Run name (the config file's stem)."})

    def __post_init__(self) -> None:
        """Checks that span sections: a value that is fine alone but not with another section's."""
        if not self.model.arch and self.data.image_size < self.model.min_image_size:
            raise ConfigError(f"data.image_size: {self.data.image_size} px is below {self.model.min_image_size} px, "
                              f"the smallest input this model (input_stride {self.model.input_stride}, "
                              f"{max(s[0] for s in self.model.stages)} resolutions) can downsample")
        if self.latency.channels_last is None:  # null: time in the format the network trains in
            self.latency.channels_last = self.train.channels_last

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
