"""The ``latency`` section of the run configuration: where and how per-channel latency is measured.

Its own module only for size: it is one section of :mod:`dist_hrnas.config.schema`'s ``Config``.
"""
from __future__ import annotations

from dataclasses import dataclass

from dist_hrnas.config.checks import choice, finite, positive
from dist_hrnas.config.checks import documented as _f
from dist_hrnas.errors import ConfigError

# train.channels_last's default (TrainConfig takes it from here), so an unresolved latency.channels_last follows it
CHANNELS_LAST_DEFAULT = True


@dataclass
class LatencyConfig:
    """Where and how per-channel latency is measured."""

    device: str = _f("cpu", "Target device the search optimises for: cpu or cuda[:N].")
    lut: str = _f("", "Latency lookup-table JSON file to reuse/extend (empty = measure without caching).")
    batch_size: int = _f(1, "Batch size of the timed forward passes (1 = latency, larger = throughput).")
    threads: int = _f(1, "CPU threads while timing (fixed so numbers are comparable).")
    warmup: int = _f(5, "Untimed runs before timing each op.")
    repeats: int = _f(15, "Timed runs per op; the median is used.")
    network_repeats: int = _f(15, "Timed runs of the whole network (the supernet, after every shrink) per round; "
                                  "the figure is the fastest of 3 rounds' medians (it decides whether a budget "
                                  "is met, and interference only ever slows a round down).")
    candidate_repeats: int = _f(5, "Timed runs per round when a shrink's candidate is measured against the network "
                                   "now (2-3 rounds, each network in a process of its own, the network now's kept "
                                   "from the comparison before: 2 untimed runs first, 1 before each later round). "
                                   "Fewer than network_repeats: both are timed in the same rounds, so a slow "
                                   "spell falls on both and their ratio needs fewer runs than an absolute figure "
                                   "(on the digits supernet 3 rounds of 5 gave the ratios 2 rounds of 15 gave, "
                                   "in 0.4x the time).")
    cost: str = _f("fixed_plus_marginal", "Per-channel cost of a branch: average = seconds / width at the "
                   "supernet (the seed's rule); marginal = slope of its latency-vs-width curve at the current "
                   "width (follows the hardware's staircase, refreshed after every shrink); fixed_plus_marginal "
                   "(the default: bench/search_quality.py, README) = the slope per channel plus a group term on "
                   "each branch's scales (the L2 norm) weighted by its fixed seconds, which only go with its last "
                   "channel (launch-bound networks, batch 1), and likewise each block's join.")
    width_step: int = _f(8, "Each branch's latency curve (prediction, marginal cost) is sampled every width_step "
                            "channels (coarser for wide branches, see max_samples), always including the "
                            "current width and one step below.")
    flush_cache_mb: float = _f(8.0, "MiB of memory written between timed runs of a single op (kernel branch, "
                                     "fixed part, block join), so that it reads its weights and input from "
                                     "memory as inside a network, not from the cache that running it alone keeps "
                                     "warm (warm-cache ops summed 5-16 % short of the network on a CPU with 2 MiB "
                                     "L2 per core); about 4x the per-core L2 (or the GPU's L2) is right. "
                                     "0 = warm caches. Whole networks are timed without it.")
    clean_process: bool = _f(True, "Time each whole network (the supernet, after every shrink) in a fresh child "
                                   "process, as in deployment: after training steps the same network ran 4-16 % "
                                   "slower in the training process (see dist_hrnas/latency/clean_process.py). false = "
                                   "time in the training process.")
    network_spread: float = _f(0.05, "End-to-end rounds that disagree by more than this fraction ((slowest - "
                                      "fastest) / fastest) are taken again, at most twice; the spread is reported.")
    calibration_networks: int = _f(24, "Sampled sub-networks (widths from full to near-empty, whole branches "
                                       "removed, on and off the channel grid) timed end to end when the latency "
                                       "model is built, to calibrate the per-op sum on whole networks (kept in "
                                       "latency.lut); 0 = calibrate on the supernet alone.")
    max_samples: int = _f(12, "At most about this many widths per branch curve (keeps profiling fast).")
    backend: str = _f("torch", "Runtime the ops are timed with: torch (eager) or onnxruntime (each op exported to "
                               "ONNX; CPU provider, CUDA provider on cuda devices). Needs the onnx extra.")
    form: str = _f("deployed", "Form of the network that ops and whole networks are timed in: deployed = every "
                               "BatchNorm folded into the conv before it, as python -m dist_hrnas.export writes "
                               "it and every deployment runtime runs it (folding alone made a 3-branch block "
                               "15-25 % faster on a CPU); eager = BN as separate modules, as in training.")
    lut_strict: bool = _f(False, "A latency.lut built for another device fingerprint: false = warn and measure "
                                 "this device (adding its entries), true = stop with an error.")
    channels_last: bool | None = _f(None, "Time ops, block joins, the fixed part and whole networks in "
                                          "torch.channels_last (true) or the default format (false); null = "
                                          "follow train.channels_last, the format the network trains and runs in. "
                                          "Part of the LUT fingerprint (as memory_format, when channels_last).")
    retime_final: bool = _f(True, "At the end of a search that shrank, time the supernet and the searched network "
                                  "again, together in the same rounds (each in a fresh process), and report both "
                                  "and their ratio in summary.json (latency_ms_supernet_retimed, "
                                  "latency_ms_searched_retimed, speedup_retimed): a search's own figures come from "
                                  "the minutes they were taken in, and on a shared machine those moved 1.5x for "
                                  "minutes (README). Not with latency.lut_device (nothing is timed here).")
    lut_device: str = _f("", "The target is another machine: use latency.lut's table measured there (its "
                             "device_name, as the profile CLI prints it; auto = the file's only table for these "
                             "settings) and time nothing here. End-to-end figures are then the LUT's supernet "
                             "measurement scaled by the latency model. Empty = measure on this machine.")

    @property
    def timed_channels_last(self) -> bool:
        """``channels_last`` resolved; null here means a LatencyConfig built outside a Config (which resolves it
        from train.channels_last): train.channels_last's default then."""
        return CHANNELS_LAST_DEFAULT if self.channels_last is None else self.channels_last

    def __post_init__(self) -> None:
        finite(self, "latency")
        if not (self.device == "cpu" or self.device == "cuda" or
                (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ConfigError(f"latency.device: {self.device!r} is not cpu, cuda or cuda:N")
        positive("latency", "batch_size", self.batch_size)
        positive("latency", "threads", self.threads)
        positive("latency", "warmup", self.warmup, allow_zero=True)
        positive("latency", "repeats", self.repeats)
        positive("latency", "network_repeats", self.network_repeats)
        positive("latency", "candidate_repeats", self.candidate_repeats)
        choice("latency", "cost", self.cost, ("average", "marginal", "fixed_plus_marginal"))
        choice("latency", "backend", self.backend, ("torch", "onnxruntime"))
        positive("latency", "width_step", self.width_step)
        choice("latency", "form", self.form, ("deployed", "eager"))
        if self.flush_cache_mb < 0:
            raise ConfigError(f"latency.flush_cache_mb: must be >= 0 (0 = warm caches), got {self.flush_cache_mb}")
        if self.max_samples < 2:
            raise ConfigError(f"latency.max_samples: must be >= 2, got {self.max_samples}")
        positive("latency", "calibration_networks", self.calibration_networks, allow_zero=True)
        positive("latency", "network_spread", self.network_spread)
        if self.lut_device and not self.lut:
            raise ConfigError("latency.lut_device: needs latency.lut, the LUT file built on that device with "
                              "python -m dist_hrnas.profile")
