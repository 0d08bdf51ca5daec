"""Latency on the target device: what to time (``measure``: ops; ``networks``: whole networks and the
calibration), how (``timing``), the curves and prediction the search uses (``curve``), the LUT cache file
(``lut``), whole networks in fresh processes (``clean_process``) and the onnxruntime backend (``onnx_backend``,
imported only when chosen).

May import config, models and ``parallel.comm`` (rank 0 measures, the others receive); never search or train.
This face re-exports what the layers above use.
"""
from dist_hrnas.latency.clean_process import CleanProcessTimer, start_network_timer
from dist_hrnas.latency.curve import Curve, LatencyProfile, branch_key, curve_value, marginal_s, sample_widths
from dist_hrnas.latency.lut import LatencyTable, device_name, read_lut_file
from dist_hrnas.latency.measure import block_input_shapes, branch_widths, profile_on_rank0
from dist_hrnas.latency.networks import measure_network, measure_network_on_rank0
from dist_hrnas.latency.timing import NoTiming, Timed, Timer, Timing, cpu_threads, make_timer, target_device

__all__ = ["CleanProcessTimer", "Curve", "LatencyProfile", "LatencyTable", "NoTiming", "Timed", "Timer", "Timing",
           "block_input_shapes", "branch_key", "branch_widths", "cpu_threads", "curve_value", "device_name",
           "make_timer", "marginal_s", "measure_network", "measure_network_on_rank0", "profile_on_rank0",
           "read_lut_file", "sample_widths", "start_network_timer", "target_device"]
