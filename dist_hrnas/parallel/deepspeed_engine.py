"""DeepSpeed (ZeRO stage 0, 1 or 2) behind the :class:`~dist_hrnas.parallel.engine.LocalEngine` interface.

Like DDP, the engine is rebuilt after every shrink around the shrunk module and a fresh torch optimizer that
may already hold (sliced) state. At stage 0 DeepSpeed steps that torch optimizer directly. At stage 1/2 ZeRO
re-points the torch optimizer at flat fp32 partitions and ignores state keyed by the module parameters, so
the state is snapshotted before ``deepspeed.initialize`` and written back afterwards: one zero-gradient step
of the flat partitions at lr = weight_decay = 0 creates the partitioned state (parameters stay bit-identical),
then every parameter's full state is scattered into it with ``safe_set_full_optimizer_state``. ZeRO keeps one scalar
(Adam's ``step``) per flat partition, i.e. per param group, restored from the carried parameters.

Memory format (``train.channels_last``): DeepSpeed 0.19 broadcasts every parameter as ``p.data.view(uint8)``, which
fails on a channels_last tensor (its last stride is not 1), and ZeRO 1/2 copy the parameters into flat buffers
and re-point them at contiguous (NCHW) views of those. So DeepSpeed is handed the module in the default format;
at stage 0 (no flat buffers) the parameters and their optimizer state go back to channels_last afterwards; at
stage 1/2 they stay the flat buffers' views, and only the batches (hence the activations, which convolutions
produce in their input's format) are channels_last.

Gradient accumulation: the training loop calls ``backward`` once per micro-batch and ``step`` once. With
``managed_gradient_accumulation: false`` (our default) every ``engine.step()`` is the accumulation boundary,
which is exactly that contract. If a config turns managed accumulation on, ``backward`` calls
``engine.step()`` itself (DeepSpeed updates on every ``gradient_accumulation_steps``-th call) and ``step``
does nothing.
"""
from __future__ import annotations

import contextlib
import difflib
import gc
import json
import os
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch import nn

from dist_hrnas.models.layout import match_optimizer_state_, set_memory_format_
from dist_hrnas.parallel import comm
from dist_hrnas.parallel.engine import LocalEngine
from dist_hrnas.errors import UserError

_HOOKS = ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check")

# The top-level keys DeepSpeed (0.19, deepspeed/runtime/config.py and the section parsers it calls) reads, plus
# our own two (zero_stage, config). DeepSpeed ignores any other top-level key without a word, so a typo such as
# zero_stag would silently train at ZeRO-0: every key is checked against this list before anything runs.
DEEPSPEED_KEYS = frozenset({
    "zero_stage", "config",
    "activation_checkpointing", "aio", "amp", "autotuning", "bf16", "checkpoint", "comet", "comms_logger",
    "communication_data_type", "compression_training", "csv_monitor", "curriculum_learning", "data_efficiency",
    "data_types", "dataloader_drop_last", "disable_allgather", "disable_python_gc", "dump_state", "elasticity",
    "expert_parallel", "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_allreduce_op",
    "gradient_clipping", "gradient_predivide_factor", "hybrid_engine", "log_level", "lower_precision_safe_modules",
    "managed_gradient_accumulation", "memory_breakdown", "nebula", "optimizer", "pipeline", "prescale_gradients",
    "scheduler", "seq_parallel_communication_data_type", "sparse_attention", "steps_per_print", "tensor_parallel",
    "tensorboard", "timers", "torch_autocast", "train_batch_size", "train_micro_batch_size_per_gpu",
    "use_data_before_expert_parallelism", "vocabulary_size", "wall_clock_breakdown", "wandb",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "zero_optimization"})


def _unknown_key(key: str, where: str) -> UserError:
    close = difflib.get_close_matches(key, sorted(DEEPSPEED_KEYS), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "see https://www.deepspeed.ai/docs/config-json/"
    return UserError(f"dist.deepspeed.{key}{where}: not a DeepSpeed config key; {hint}")


def check_deepspeed_settings(ds_settings: dict) -> None:
    """Refuse ``dist.deepspeed`` settings DeepSpeed would reject or silently ignore, before anything runs.

    Unknown top-level keys (DeepSpeed ignores them) and ``zero_optimization`` checked against DeepSpeed's own
    schema (its pydantic ``DeepSpeedZeroConfig`` forbids unknown fields); then everything :func:`deepspeed_config`
    refuses (stage 3, optimizer/scheduler sections, fp16, gradient_clipping). Same answer at any world size.
    """
    settings = dict(ds_settings or {})
    where = ""
    if "config" in settings and len(settings) == 1:
        settings, where = _load_json(settings["config"]), f" (in {ds_settings['config']})"
    for key in settings:
        if key not in DEEPSPEED_KEYS or (where and key in ("zero_stage", "config")):
            raise _unknown_key(str(key), where)
    cfg = deepspeed_config(ds_settings, 1, 1, False)
    zero = cfg.get("zero_optimization")
    if isinstance(zero, dict):
        try:
            from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        except ImportError:
            raise UserError("dist.engine=deepspeed needs DeepSpeed: pip install deepspeed") from None
        try:
            DeepSpeedZeroConfig(**zero)
        except Exception as err:  # pydantic's ValidationError: name the first field it names
            first = getattr(err, "errors", lambda: [{}])()[0]
            field = ".".join(str(x) for x in first.get("loc", ())) or "?"
            raise UserError(f"dist.deepspeed.zero_optimization.{field}{where}: {first.get('msg', err)} "
                            f"(DeepSpeed's ZeRO config schema)") from None


def _stage_error(stage: object) -> UserError:
    return UserError(f"dist.deepspeed.zero_stage={stage} is not supported: use 0, 1 or 2")


def _load_json(path: object) -> dict:
    try:
        loaded = json.loads(Path(str(path)).read_text())
    except FileNotFoundError:
        raise UserError(f"dist.deepspeed.config: DeepSpeed config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"dist.deepspeed.config: cannot read DeepSpeed config file {path} as JSON: {err}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"dist.deepspeed.config: DeepSpeed config file {path} must hold a JSON object")
    return loaded


def deepspeed_config(ds_settings: dict, micro_batch: int, grad_accum: int, bf16: bool,
                     grad_clip_norm: float = 0.0) -> dict:
    """The DeepSpeed config dict from ``dist.deepspeed``: ``{config: file.json}`` or ``{zero_stage: N, ...}``.

    Batch sizes, accumulation, bf16 and gradient clipping always come from our own config; the optimizer and
    schedule too (a torch optimizer is passed in), so a config with an ``optimizer`` or ``scheduler`` section,
    or its own ``gradient_clipping``, is an error. Clipping is set explicitly because DeepSpeed's default
    (1.0) would silently make DeepSpeed runs train differently from DDP runs.
    """
    settings = dict(ds_settings or {})
    if "config" in settings:
        path = settings.pop("config")
        if settings:
            raise UserError(f"dist.deepspeed: give either config: <file> or separate keys, not both "
                            f"(also got {sorted(settings)})")
        cfg, where = _load_json(path), f" (in {path})"
    else:
        cfg, where = settings, ""
        zero = cfg.get("zero_optimization") or {}
        if not isinstance(zero, dict):
            raise UserError(f"dist.deepspeed.zero_optimization: expected a mapping of ZeRO settings, got {zero!r}")
        stage = settings.pop("zero_stage", zero.get("stage", 0))
        if "stage" in zero and zero["stage"] != stage:
            raise UserError(f"dist.deepspeed: zero_stage={stage} and zero_optimization.stage={zero['stage']} "
                            f"disagree; give one of them")
        cfg["zero_optimization"] = {**zero, "stage": stage}
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise UserError(f"dist.deepspeed: the DeepSpeed config{where} has a '{section}' section; remove it: "
                            f"train.optimizer and the train.lr_* settings build the optimizer and schedule "
                            f"that DeepSpeed wraps")
    if "gradient_clipping" in cfg:
        raise UserError(f"dist.deepspeed: the DeepSpeed config{where} sets gradient_clipping; remove it and set "
                        f"train.grad_clip_norm instead (it applies to every engine)")
    zero = cfg.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else zero
    if isinstance(stage, bool) or stage not in (0, 1, 2):
        raise _stage_error(stage)
    if isinstance(cfg.get("fp16"), dict) and cfg["fp16"].get("enabled"):
        raise UserError(f"dist.deepspeed: fp16{where} is not supported; use train.bf16")
    cfg.pop("train_batch_size", None)                          # DeepSpeed derives it from the two below
    cfg["train_micro_batch_size_per_gpu"] = int(micro_batch)
    cfg["gradient_accumulation_steps"] = int(grad_accum)
    # bf16 the way DDP does it: fp32 parameters, bf16 compute under torch.autocast (train.autocast);
    # a config file's own bf16 section is overridden, like the batch sizes.
    # DeepSpeed's own bf16 mode casts the module's parameters to bf16 but keeps the BN buffers fp32, so
    # batch_norm failed ("expected scalar type BFloat16 but found Float"), and evaluation, BN calibration,
    # surgery and latency timing would all have run a bf16 module on fp32 inputs.
    cfg["bf16"] = {**(cfg.get("bf16") or {}), "enabled": False}
    cfg["torch_autocast"] = {**(cfg.get("torch_autocast") or {}), "enabled": bool(bf16), "dtype": "bfloat16"}
    cfg["gradient_clipping"] = float(grad_clip_norm)
    cfg["steps_per_print"] = 10 ** 9
    cfg.setdefault("managed_gradient_accumulation", False)
    # ZeRO refuses torch optimizers other than Adam/AdamW unless told; SGD and RMSprop partition just as well
    cfg.setdefault("zero_allow_untested_optimizer", True)
    return cfg


class DeepSpeedEngine(LocalEngine):
    """``deepspeed.initialize`` around the module and a torch optimizer whose existing state is kept exactly."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, ctx: comm.DistContext,
                 ds_config: dict, channels_last: bool = False):
        import deepspeed

        super().__init__(module, optimizer)
        self.ctx = ctx
        os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))  # torchrun sets it; DeepSpeed insists on it
        self._group_dicts = list(optimizer.param_groups)      # DeepSpeed swaps their 'params' in place
        self._groups = [list(g["params"]) for g in self._group_dicts]   # module parameters, torch's order
        carried = {p: dict(s) for p, s in optimizer.state.items() if s}
        set_memory_format_(module, channels_last=False)        # see the module docstring
        self.engine = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)[0]
        managed = getattr(self.engine, "managed_gradient_accumulation", lambda: True)()
        self._micro_steps_per_update = self.engine.gradient_accumulation_steps() if managed else 1
        wrapper = type(self.engine.optimizer).__name__
        # ZeRO links every parameter to its fp32 fragment (None where another rank owns all of it)
        self.partitioned = self.engine.optimizer is not optimizer and \
            all(hasattr(p, "_hp_mapping") for group in self._groups for p in group)
        if self.engine.optimizer is not optimizer and not self.partitioned:
            self.release()
            raise UserError(f"dist.deepspeed: DeepSpeed wrapped the optimizer in {wrapper}, which keeps no "
                            f"per-parameter state mapping; with bf16 use zero_stage 1 or 2")
        if self.partitioned:
            for p in carried:
                optimizer.state.pop(p, None)                   # ZeRO steps flat partitions, not these
            if carried:
                self._restore(carried)
        elif channels_last:                                    # stage 0: the torch optimizer steps the module
            set_memory_format_(module, channels_last=True)
            match_optimizer_state_(optimizer)

    # -- training --------------------------------------------------------------------------------------
    def forward_module(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine(x)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)       # the loop already divides by the micro-batches
        if self._micro_steps_per_update > 1:
            self.engine.step()                                  # managed: DeepSpeed updates at the boundary

    def step(self) -> None:
        if self._micro_steps_per_update == 1:
            self.engine.step()

    def no_sync(self) -> ContextManager:
        return contextlib.nullcontext()                        # DeepSpeed handles accumulation boundaries

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose group ``lr`` DeepSpeed uses: drive it with the LR scheduler."""
        return self.optimizer

    # -- partitioned optimizer state -------------------------------------------------------------------
    def _flat_states(self) -> list[tuple[torch.Tensor, dict]]:
        """(flat fp32 partition, its torch state) per non-empty param group, in group order."""
        groups = self.engine.optimizer.optimizer.param_groups
        return [(g["params"][0], self.engine.optimizer.optimizer.state.get(g["params"][0], {})) for g in groups]

    def _nonempty_groups(self) -> list[list[nn.Parameter]]:
        return [group for group in self._groups if group]

    def _link_state(self) -> list[tuple[torch.Tensor, dict]]:
        """Point every parameter's fragment at its group's current flat state; returns ``_flat_states()``.

        ZeRO links the fragments once, right after stepping the *first* param group, so the parameters of
        later groups stay linked to empty state and ``safe_get_full_optimizer_state`` raises "exp_avg not
        found in optimizer state fragment" for them (DeepSpeed 0.19.8). Relinking is cheap (views only).
        """
        flat_states = self._flat_states()
        for params, (flat, state) in zip(self._nonempty_groups(), flat_states):
            for p in params:
                if p._hp_mapping is not None:
                    p._hp_mapping.set_optim_state_fragment(flat, state)
        return flat_states

    @torch.no_grad()
    def _prime(self) -> None:
        """Step the flat partitions once on zero gradients at lr = weight_decay = 0: the torch optimizer
        creates its state for them (ZeRO's own step would do the same after a backward, a gradient reduce and
        1,500 per-parameter hooks on the ImageNet supernet); no weight moves and no DeepSpeed counter changes."""
        groups = self.optimizer.param_groups                   # ZeRO re-pointed them at the flat partitions
        saved = [(g["lr"], g.get("weight_decay")) for g in groups]
        flats = [flat for g in groups for flat in g["params"]]
        for g in groups:
            g["lr"] = 0.0
            if "weight_decay" in g:
                g["weight_decay"] = 0.0
        try:
            for flat in flats:
                flat.grad = torch.zeros_like(flat)
            self.optimizer.step()
        finally:
            for flat in flats:
                flat.grad = None
            for g, (lr, wd) in zip(groups, saved):
                g["lr"] = lr
                if wd is not None:
                    g["weight_decay"] = wd

    @torch.no_grad()
    def _restore(self, carried: dict[nn.Parameter, dict]) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        self._prime()
        for params, (flat, state) in zip(self._nonempty_groups(), self._link_state()):
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == flat.shape:
                    for p in params:                           # same order on every rank
                        old = carried.get(p, {}).get(key)
                        full = torch.zeros(p.shape, dtype=torch.float32) if old is None else old
                        safe_set_full_optimizer_state(p, full.to(device=flat.device, dtype=flat.dtype), key)
                else:                                          # per-group scalars such as Adam's step
                    old = next((carried[p][key] for p in params if key in carried.get(p, {})), None)
                    if old is None:
                        continue
                    if torch.is_tensor(value) and torch.is_tensor(old):
                        value.copy_(old)
                    else:
                        state[key] = old.clone() if torch.is_tensor(old) else old

    def optimizer_view(self) -> Any:
        """Full per-parameter state (a collective at stage 1/2: every rank calls it) as a torch optimizer."""
        if not self.partitioned:
            return self.optimizer
        view = type(self.optimizer)([{**{k: v for k, v in g.items() if k != "params"}, "params": params}
                                     for g, params in zip(self._group_dicts, self._groups)])
        for params, (flat, state) in zip(self._nonempty_groups(), self._link_state()):
            per_param: dict[str, list[torch.Tensor]] = {}     # partitioned tensors, gathered group-wide
            shared: dict[str, Any] = {}                        # per-group scalars such as Adam's step
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == flat.shape:
                    per_param[key] = _gather_group_state(params, key, flat.device)
                else:
                    shared[key] = value
            if not state:
                continue
            for i, p in enumerate(params):
                view.state[p] = {key: value.detach().clone() if torch.is_tensor(value) else value
                                 for key, value in shared.items()} | {key: v[i] for key, v in per_param.items()}
        return view

    def optimizer_state_dict(self) -> dict:
        return self.optimizer_view().state_dict()

    def release(self) -> None:
        """``engine.destroy()``, unhook the module, drop every reference and collect garbage."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.destroy()
            for name in _HOOKS:                                 # they close over the engine: the module would
                handle = getattr(engine, name, None)            # keep it (and its buffers) alive
                if handle is not None:
                    handle.remove()
            if self.partitioned and self.optimizer is not None:
                self.optimizer.state.clear()                   # flat partitions' state: useless now
        self.engine = None
        super().release()
        del engine
        gc.collect()


@torch.no_grad()
def _gather_group_state(params: list[nn.Parameter], key: str, device: torch.device) -> list[torch.Tensor]:
    """Every parameter's full ``key`` state of one ZeRO param group, in one all-reduce.

    Each rank owns fragments of the group's flat fp32 partition; ``safe_get_full_optimizer_state`` assembles
    one parameter per all-reduce, which on the ImageNet supernet (~1,400 tensors) made a shrink take seconds.
    Here every rank writes its fragments into one zero buffer laid out parameter after parameter and a single
    sum over the ranks completes it (fragments do not overlap, so the sum is a concatenation).
    """
    sizes = [p.numel() for p in params]
    buffer = torch.zeros(sum(sizes), dtype=torch.float32, device=device)  # nccl needs it on the GPU
    offset = 0
    for p, size in zip(params, sizes):
        if p._hp_mapping is not None:
            address = p._hp_mapping.lp_fragment_address
            fragment = p._hp_mapping.get_hp_fragment(key).detach().flatten()
            buffer.narrow(0, offset + address.start, address.numel).copy_(fragment.to(buffer.dtype))
        offset += size
    comm.all_reduce_sum_(buffer)
    return [part.view(p.shape).clone() for part, p in zip(buffer.split(sizes), params)]
