"""HR-NAS search space: blocks, the multi-resolution network, architecture files, counting; ``layout``: the
memory format (channels_last) of modules, parameters and optimizer state."""
from dist_hrnas.models.arch import (as_network, build_model, export_arch, model_from_arch, load_arch_file,
                                   save_arch_file)
from dist_hrnas.models.blocks import AtomicBlock, KernelBranch
from dist_hrnas.models.counting import count_macs, count_params
from dist_hrnas.models.hrnet import HRNet

__all__ = ["AtomicBlock", "HRNet", "KernelBranch", "as_network", "build_model", "count_macs", "count_params",
           "export_arch", "load_arch_file", "model_from_arch", "save_arch_file"]
