"""DeepSpeed engine on 2 CPU ranks (gloo): optimizer state survives shrink + rebuild exactly at ZeRO 0/1/2 (in
both memory formats), old engines are freed, one update per accumulated step, and the config is checked before
anything starts."""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import weakref

import pytest
import torch

pytest.importorskip("deepspeed")

from dist_hrnas.parallel.deepspeed_engine import DeepSpeedEngine, deepspeed_config  # noqa: E402
from dist_hrnas.errors import UserError  # noqa: E402
from tests.conftest import CONFIGS, TINY_MODEL  # noqa: E402
from tests.multirank import run_ranks  # noqa: E402

SMALL = [*TINY_MODEL, "train.optimizer=adamw", "train.lr=0.01", "train.weight_decay=0.01", "model.dropout=0.0"]
LR = 0.01


def _setup(*overrides: str, channels_last: bool = False):
    from dist_hrnas.config import load_config
    from dist_hrnas.models import build_model
    from dist_hrnas.models.layout import set_memory_format_

    cfg = load_config(CONFIGS / "digits.yaml", [*SMALL, *overrides])
    torch.manual_seed(0)
    return cfg, set_memory_format_(build_model(cfg.model), channels_last)


def _engine(model, optimizer, rank: int, stage: int, accum: int = 1, channels_last: bool = False,
            **extra) -> DeepSpeedEngine:
    from dist_hrnas.parallel.comm import DistContext

    ctx = DistContext(rank=rank, world_size=2, backend="gloo")
    return DeepSpeedEngine(model, optimizer, ctx, deepspeed_config({"zero_stage": stage, **extra}, 4 // accum,
                                                                   accum, False), channels_last=channels_last)


def _train(engine, rank: int, steps: int, accum: int = 1, channels_last: bool = False) -> None:
    import torch.nn.functional as F

    from dist_hrnas.models.layout import memory_format, to_format

    gen = torch.Generator().manual_seed(10 + rank)             # each rank its own data
    for _ in range(steps):
        x, y = torch.randn(4, 1, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen)
        x = to_format(x, memory_format(channels_last))          # as the loaders yield batches
        for xc, yc in zip(x.chunk(accum), y.chunk(accum)):
            engine.backward(F.cross_entropy(engine(xc), yc) / accum)
        engine.step()


def _masks(model, drop: int) -> dict:
    """Drop ``drop`` hidden channels of every branch of the first two blocks (the same on every rank)."""
    return {name: [torch.arange(w) >= drop for w in block.widths] for name, block in model.named_blocks()[:2]}


def _state(view, model) -> dict[str, dict]:
    return {name: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in view.state[p].items()}
            for name, p in model.named_parameters() if p in view.state}


def _hash(model) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()


def _release(engine) -> None:
    engine.release()
    gc.collect()


def _layouts(engine, model, channels_last: bool) -> list[str]:
    """4-D parameters not in the format the engine keeps them in (channels_last at stage 0 when asked; ZeRO 1/2:
    its flat buffers' default format), and optimizer state laid out unlike its parameter."""
    from dist_hrnas.models.layout import in_format

    fmt = torch.channels_last if channels_last and not engine.partitioned else torch.contiguous_format
    view = engine.optimizer_view()
    wrong = [name for name, p in model.named_parameters() if not in_format(p, fmt)]
    return wrong + [f"{name}.{key}" for name, p in model.named_parameters() for key, v in view.state.get(p, {}).items()
                    if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride()]


def _shrink_rank(rank: int, channels_last: bool) -> dict:
    from deepspeed.utils import safe_get_full_optimizer_state

    from dist_hrnas.optim import build_optimizer
    from dist_hrnas.search.surgery import carry_optimizer_state, shrink_model

    out = {}
    for stage in (0, 1, 2):
        cfg, model = _setup(channels_last=channels_last)
        engine = _engine(model, build_optimizer(model, cfg.train, LR), rank, stage, channels_last=channels_last)
        _train(engine, rank, 3, channels_last=channels_last)
        view = engine.optimizer_view()
        old_state, old_params = _state(view, model), dict(model.named_parameters())
        old_shapes = {name: p.shape for name, p in old_params.items()}
        result = shrink_model(model, _masks(model, 2))
        new_opt = build_optimizer(model, cfg.train, LR)
        carry_optimizer_state(view, old_params, new_opt, model, result)
        old_engine = weakref.ref(engine.engine)
        _release(engine)
        freed = old_engine() is None                            # nothing (module hooks!) keeps it alive
        del view, old_params
        before = [p.detach().clone() for p in model.parameters()]
        engine = _engine(model, new_opt, rank, stage, channels_last=channels_last)
        layouts = _layouts(engine, model, channels_last)
        unchanged = all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
        new_state = _state(engine.optimizer_view(), model)
        mismatches, compared = [], 0
        for name, p in model.named_parameters():
            where = result.params[name]
            old = old_state[where.old_name]
            for key, value in old.items():
                sliced = torch.is_tensor(value) and value.shape == old_shapes[where.old_name]
                want = where.apply(value) if sliced else value
                got = new_state[name][key]
                if engine.partitioned and key != "step":      # straight from ZeRO as well, not only the view
                    got = safe_get_full_optimizer_state(p, key)
                compared += 1
                if not torch.equal(torch.as_tensor(got), torch.as_tensor(want)):
                    mismatches.append(f"{name}.{key}")
        _train(engine, rank, 1, channels_last=channels_last)
        steps = sorted({float(s["step"]) for s in _state(engine.optimizer_view(), model).values()})
        out[stage] = {"layouts": layouts,
                      "freed": freed, "unchanged": unchanged, "mismatches": mismatches, "compared": compared, "steps": steps,
                      "hash": _hash(model), "params": [p.detach().clone() for p in model.parameters()],
                      "shrunk": any(where.dim is not None for where in result.params.values())}
        _release(engine)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True], ids=["default_format", "channels_last"])
def test_optimizer_state_survives_shrink_and_rebuild_exactly_at_every_zero_stage(channels_last):
    """DeepSpeed 0.19 cannot broadcast channels_last parameters and ZeRO 1/2 re-point them at its flat NCHW
    buffers: the engine hands DeepSpeed the default format and takes channels_last back at stage 0 only."""
    (s0, r0), (s1, r1) = run_ranks(_shrink_rank, channels_last)
    assert s0 == s1 == "ok", (r0, r1)
    for stage in (0, 1, 2):
        a, b = r0[stage], r1[stage]
        assert a["layouts"] == b["layouts"] == [], f"stage {stage}: parameters or state in the wrong format"
        assert a["shrunk"] and a["compared"] > 50
        assert a["freed"] and b["freed"], f"stage {stage}: the old DeepSpeed engine outlived its release"
        assert a["unchanged"] and b["unchanged"], f"stage {stage}: state initialisation moved the weights"
        assert a["mismatches"] == b["mismatches"] == [], f"stage {stage}"
        assert a["steps"] == b["steps"] == [4.0], f"stage {stage}: Adam's step count did not carry over"
        assert a["hash"] == b["hash"], f"stage {stage}: ranks diverged"
    for stage in (1, 2):                                       # same trajectory as plain data parallel
        for p0, p in zip(r0[0]["params"], r0[stage]["params"]):
            torch.testing.assert_close(p, p0, rtol=1e-4, atol=1e-5)


def _trajectories(rank: int) -> dict:
    from dist_hrnas.parallel.engine import DDPEngine
    from dist_hrnas.optim import build_optimizer

    out = {}
    # Accumulation changes the order gradients are summed in (ZeRO-2 reduces every micro-batch), and Adam
    # turns rounding noise on near-zero gradients into full-size steps: compare accumulation with SGD.
    for name, stage, accum in [("ddp", None, 1), ("ddp_accum2", None, 2), ("zero0", 0, 1), ("zero1", 1, 1),
                               ("zero2", 2, 1), ("zero2_accum2", 2, 2), ("zero1_accum2", 1, 2),
                               ("ddp_channels_last", None, 1), ("zero0_channels_last", 0, 1),
                               ("zero2_channels_last", 2, 1)]:
        channels_last = name.endswith("channels_last")
        cfg, model = _setup(*(["train.optimizer=sgd"] if accum > 1 else []), channels_last=channels_last)
        optimizer = build_optimizer(model, cfg.train, LR)
        engine = DDPEngine(model, optimizer, torch.device("cpu")) if stage is None else \
            _engine(model, optimizer, rank, stage, accum, channels_last=channels_last)
        if stage is None and accum > 1:                           # what the training loop does with DDP
            _train_no_sync(engine, rank, 3, accum)
        else:
            _train(engine, rank, 3, accum, channels_last=channels_last)
        out[name] = [p.detach().clone() for p in model.parameters()]
        _release(engine)
    return out


def _train_no_sync(engine, rank: int, steps: int, accum: int) -> None:
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(10 + rank)
    for _ in range(steps):
        x, y = torch.randn(4, 1, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen)
        chunks = list(zip(x.chunk(accum), y.chunk(accum)))
        for j, (xc, yc) in enumerate(chunks):
            with engine.no_sync() if j < len(chunks) - 1 else contextlib.nullcontext():
                engine.backward(F.cross_entropy(engine(xc), yc) / accum)
        engine.step()


@pytest.mark.slow
def test_deepspeed_trains_exactly_like_ddp_at_every_zero_stage_and_with_accumulation():
    """Same data, same optimizer: DeepSpeed (no clipping unless train.grad_clip_norm says so) == DDP."""
    (s0, r0), (s1, r1) = run_ranks(_trajectories)
    assert s0 == s1 == "ok", (r0, r1)
    for name in ("zero0", "zero1", "zero2"):
        for p, ref in zip(r0[name], r0["ddp"]):
            torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6, msg=name)
    for name in ("zero1_accum2", "zero2_accum2"):
        for p, ref in zip(r0[name], r0["ddp_accum2"]):
            torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6, msg=name)
    for name in ("zero0_channels_last", "zero2_channels_last"):
        for p, ref in zip(r0[name], r0["ddp_channels_last"]):
            torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6, msg=name)
    for name in r0:
        assert all(torch.equal(a, b) for a, b in zip(r0[name], r1[name])), f"{name}: ranks diverged"


def test_deepspeed_config_takes_batch_accumulation_and_clipping_from_our_config():
    cfg = deepspeed_config({"zero_stage": 2, "zero_optimization": {"overlap_comm": False}}, 8, 2, False, 1.5)
    assert cfg["zero_optimization"] == {"overlap_comm": False, "stage": 2}
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == 1.5 and cfg["bf16"]["enabled"] is False


@pytest.mark.parametrize("settings, needle", [
    ({"zero_stage": 3}, "zero_stage=3"),
    ({"zero_stage": 1, "optimizer": {"type": "Adam"}}, "'optimizer' section"),
    ({"zero_stage": 1, "gradient_clipping": 1.0}, "train.grad_clip_norm"),
    ({"config": "/nonexistent/ds.json"}, "/nonexistent/ds.json"),
])
def test_bad_deepspeed_settings_give_one_clear_error(settings, needle):
    with pytest.raises(UserError, match=None) as err:
        deepspeed_config(settings, 4, 1, False)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_deepspeed_config_file_is_read(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert deepspeed_config({"config": str(path)}, 4, 1, False)["zero_optimization"]["stage"] == 1
    path.write_text("{not json")
    with pytest.raises(UserError, match="ds.json"):
        deepspeed_config({"config": str(path)}, 4, 1, False)


def _bf16_rank(rank: int) -> dict:
    """ZeRO-2 with bf16 (autocast as train.autocast does on CUDA; here on CPU), through a shrink and rebuild."""
    import torch.nn.functional as F

    from dist_hrnas.optim import build_optimizer
    from dist_hrnas.parallel.comm import DistContext
    from dist_hrnas.search.surgery import carry_optimizer_state, shrink_model

    cfg, model = _setup()
    ctx = DistContext(rank=rank, world_size=2, backend="gloo")
    make = lambda opt: DeepSpeedEngine(model, opt, ctx, deepspeed_config({"zero_stage": 2}, 4, 1, True))  # noqa: E731
    engine = make(build_optimizer(model, cfg.train, LR))
    gen = torch.Generator().manual_seed(10 + rank)
    x, y = torch.randn(4, 1, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    dtypes, losses = set(), []
    for _ in range(2):
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(engine(x), y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            dtypes |= {p.dtype for p in model.parameters()}
        view, old_params = engine.optimizer_view(), dict(model.named_parameters())
        result = shrink_model(model, _masks(model, 2))
        new_opt = build_optimizer(model, cfg.train, LR)
        carry_optimizer_state(view, old_params, new_opt, model, result)
        _release(engine)
        engine = make(new_opt)
    model.eval()
    with torch.no_grad():
        logits = model(x)                                     # what evaluation and BN calibration do: fp32 in
    _release(engine)
    return {"dtypes": sorted(map(str, dtypes | {p.dtype for p in model.parameters()})), "losses": losses,
            "logits": str(logits.dtype), "hash": _hash(model)}


@pytest.mark.slow
def test_deepspeed_bf16_keeps_fp32_parameters_through_training_and_shrinks():
    """train.bf16 with DeepSpeed = fp32 parameters + bf16 autocast, like DDP. DeepSpeed's own bf16 mode cast the
    parameters to bf16 and kept the BN buffers fp32: the first forward failed in batch_norm."""
    (s0, r0), (s1, r1) = run_ranks(_bf16_rank)
    assert s0 == s1 == "ok", (r0, r1)
    assert r0["dtypes"] == r1["dtypes"] == ["torch.float32"]
    assert r0["logits"] == "torch.float32" and all(map(math.isfinite, r0["losses"]))
    assert r0["hash"] == r1["hash"]


def test_deepspeed_config_maps_bf16_to_autocast_not_bf16_parameters():
    cfg = deepspeed_config({"zero_stage": 2, "bf16": {"enabled": True}}, 8, 1, True)
    assert cfg["bf16"]["enabled"] is False
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert deepspeed_config({"zero_stage": 2}, 8, 1, False)["torch_autocast"]["enabled"] is False
