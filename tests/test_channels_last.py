"""train.channels_last / latency.channels_last: the model, every batch, a shrink's new parameters, carried
optimizer state, the EMA and a resumed run stay in the configured memory format; ops are timed in it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_hrnas import train
from dist_hrnas.config import LatencyConfig, load_config
from dist_hrnas.data import build_datasets, build_loaders
from dist_hrnas.latency.lut import fingerprint
from dist_hrnas.latency.timing import runner
from dist_hrnas.models import build_model
from dist_hrnas.models.layout import format_of, in_format, memory_format, set_memory_format_, to_format
from dist_hrnas.optim import ModelEma, build_optimizer
from dist_hrnas.parallel.rewrap import build_state
from dist_hrnas.parallel.comm import DistContext
from dist_hrnas.search.surgery import carry_optimizer_state, shrink_model
from tests.conftest import CONFIGS, SEARCH, TINY_MODEL
from tests.device_lut import BOARD, lut_from_another_machine

class Interrupt(Exception):
    pass


FORMATS = pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "default_format"])


def _misplaced(module: torch.nn.Module, fmt: torch.memory_format) -> list[str]:
    """4-D parameters of ``module`` not laid out in ``fmt`` (canonical strides)."""
    return [name for name, p in module.named_parameters() if p.ndim == 4 and not in_format(p, fmt)]


def _state_misplaced(optimizer: torch.optim.Optimizer) -> list[str]:
    """Optimizer state tensors whose layout differs from their parameter's."""
    return [f"{tuple(p.shape)}.{key}" for p, state in optimizer.state.items() for key, v in state.items()
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride()]


@FORMATS
def test_a_shrink_keeps_the_format_of_every_parameter_its_optimizer_state_and_the_ema(channels_last):
    cfg = load_config(CONFIGS / "digits.yaml", [*TINY_MODEL, f"train.channels_last={channels_last}",
                                                "model.dropout=0.0", "train.optimizer=adamw"])
    fmt = memory_format(channels_last)
    torch.manual_seed(0)
    model = set_memory_format_(build_model(cfg.model), channels_last)
    ema = ModelEma(model, 0.9)
    opt = build_optimizer(model, cfg.train, 0.01)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = to_format(torch.randn(4, 1, 16, 16, generator=gen), fmt)
        F.cross_entropy(model(x), torch.randint(0, 10, (4,), generator=gen)).backward()
        opt.step()
        opt.zero_grad()
        ema.update(model)
    assert _misplaced(model, fmt) == [] and _misplaced(ema.module, fmt) == [] and _state_misplaced(opt) == []
    old_params = dict(model.named_parameters())
    masks = {name: [torch.arange(w) >= 2 for w in block.widths] for name, block in model.named_blocks()}
    result = shrink_model(model, masks)
    shrink_model(ema.module, masks)
    sliced = [name for name, where in result.params.items() if where.dim is not None]
    assert any(old_params[result.params[n].old_name].shape[2] > 1 for n in sliced if model.get_parameter(n).ndim == 4)
    state = build_state(cfg, DistContext(), model, 0.01, 10, ema,
                        fill_optimizer=lambda new: carry_optimizer_state(opt, old_params, new, model, result))
    assert _misplaced(model, fmt) == [], "a shrink created parameters in the other format"
    assert _misplaced(ema.module, fmt) == []
    assert len(state.optimizer.state) > 10 and _state_misplaced(state.optimizer) == []


def test_training_is_the_same_in_both_formats():
    """Same weights, same batch: loss and gradients agree to rounding (only kernels differ). One step only: this
    tiny network amplifies any 1e-7 perturbation ~300x per SGD step, in either format alike."""
    cfg = load_config(CONFIGS / "digits.yaml", [*TINY_MODEL, "model.dropout=0.0"])
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    grads = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = set_memory_format_(build_model(cfg.model), channels_last)
        loss = F.cross_entropy(model(to_format(x, memory_format(channels_last))), y)
        loss.backward()
        grads[channels_last] = [loss.detach()] + [p.grad for p in model.parameters()]
    for g, ref in zip(grads[True], grads[False]):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5)


@FORMATS
def test_one_shrink_and_one_resume_keep_the_format(tmp_path, monkeypatch, channels_last):
    """The trained model, its EMA and optimizer state after a shrink, and again after a resume from the checkpoint
    (model rebuilt from the stored architecture, then the weights loaded)."""
    fmt = memory_format(channels_last)
    run_dir = tmp_path / "run"
    args = ["--config", str(CONFIGS / "digits.yaml"), *SEARCH, "train.epochs=3", "train.ema_decay=0.9",
            "latency.clean_process=false", f"train.channels_last={channels_last}"]
    # What is checked is the format, not the decision: the shrink must come before the interruption however
    # loaded the machine is, so the model decides from a LUT that depends on the architecture only.
    lut = lut_from_another_machine(tmp_path / "board.json", args, even=True)
    args += [f"latency.lut={lut}", f"latency.lut_device={BOARD}", f"log.run_dir={run_dir}"]
    seen: list[tuple[int, int, list[str]]] = []
    real = train.train_one_epoch

    def spy(state, loader, search, cfg, ctx, writer, epoch):
        images, _ = next(iter(loader))
        wrong = _misplaced(state.model, fmt) + _misplaced(state.ema.module, fmt) + \
            _state_misplaced(state.engine.optimizer) + ([] if in_format(images, fmt) else ["batch"])
        seen.append((epoch, len(search.shrinks), wrong))
        if epoch == 2 and len(seen) == 3:
            raise Interrupt  # die after the checkpoint of epoch 2, then resume from it
        return real(state, loader, search, cfg, ctx, writer, epoch)

    monkeypatch.setattr(train, "train_one_epoch", spy)
    with pytest.raises(Interrupt):
        train.main(args)
    assert train.main(args) == 0
    assert [epoch for epoch, _, _ in seen] == [0, 1, 2, 2], seen
    assert seen[2][1] >= 1, "the test needs a shrink before the interruption"
    assert all(wrong == [] for _, _, wrong in seen), seen


def test_loaders_yield_channels_last_batches_when_asked():
    ds = build_datasets(load_config(CONFIGS / "digits.yaml", ["data.image_size=16"]).data)  # 1 channel
    for channels_last, fmt in ((True, torch.channels_last), (False, torch.contiguous_format)):
        train_loader, val_loader, _ = build_loaders(ds, 4, 0, 0, channels_last=channels_last)
        for loader in (train_loader, val_loader):
            images, labels = next(iter(loader))
            assert in_format(images, fmt) and labels.shape == (4,)
    assert format_of(next(iter(build_loaders(ds, 4, 0, 0, channels_last=True)[0]))[0]) == torch.channels_last


def test_latency_format_follows_train_unless_set_and_is_in_the_lut_fingerprint():
    follow = load_config(CONFIGS / "digits.yaml", ["train.channels_last=false"])
    assert follow.latency.channels_last is False
    assert load_config(CONFIGS / "digits.yaml").latency.channels_last is True
    assert load_config(CONFIGS / "digits.yaml", ["latency.channels_last=false"]).latency.channels_last is False
    assert LatencyConfig().timed_channels_last is True  # built on its own: train.channels_last's default
    cpu = torch.device("cpu")
    assert fingerprint(LatencyConfig(channels_last=True), cpu)["memory_format"] == "channels_last"
    assert "memory_format" not in fingerprint(LatencyConfig(channels_last=False), cpu)  # as LUTs from before
    conv = torch.nn.Conv2d(4, 8, 3)
    for channels_last, fmt in ((True, torch.channels_last), (False, torch.contiguous_format)):
        run = runner(conv, torch.randn(2, 4, 8, 8), LatencyConfig(channels_last=channels_last, form="eager"), cpu)
        assert in_format(conv.weight, fmt) and format_of(run()) == fmt
