"""The Trainer factory (external callbacks still load, the entry points are read once) and the
SimCLR learning-rate schedule."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest
import torch

from pipelines.models import systems


class MarkerCallback(systems.pl.Callback):
    """A callback an installed package could register under Lightning's entry-point group."""


def marker_callbacks() -> list[MarkerCallback]:
    """The factory the fake entry point names."""
    return [MarkerCallback()]


@pytest.fixture
def registered_factory(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A fake installed package registering :func:`marker_callbacks`; returns the groups
    that were looked up."""
    lookups: list[str] = []

    def fake_entry_points(group: str) -> list[EntryPoint]:
        lookups.append(group)
        value = f"{__name__}:marker_callbacks"
        return [EntryPoint(name="marker", value=value, group=group)]

    monkeypatch.setattr(systems, "entry_points", fake_entry_points)
    systems._callback_factories.cache_clear()
    yield lookups
    systems._callback_factories.cache_clear()


def test_trainers_get_fresh_external_callbacks_from_one_lookup(registered_factory) -> None:
    trainers = [systems.make_trainer(1, "cpu") for _ in range(3)]

    markers = [[cb for cb in t.callbacks if isinstance(cb, MarkerCallback)] for t in trainers]
    assert [len(found) for found in markers] == [1, 1, 1]
    assert len({id(found[0]) for found in markers}) == 3
    assert registered_factory == ["pytorch_lightning.callbacks_factory"]


def test_trainer_has_no_logger_and_the_loss_is_in_history() -> None:
    import torch

    model = torch.nn.Linear(4, 3)
    system = systems.ClassifierSystem(model, learning_rate=0.1)
    features = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    labels = features[:, :3].argmax(1)
    trainer = systems.make_trainer(5, "cpu")
    trainer.fit(system, systems.batch_loader(features, labels, batch_size=16))

    assert trainer.logger is None
    assert len(system.history) == 5
    assert system.history[-1] < system.history[0]


@pytest.mark.parametrize("warmup", [0, 3])
def test_warmup_cosine_schedule(warmup: int) -> None:
    from pipelines.models.systems import warmup_cosine_schedule

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = warmup_cosine_schedule(optimizer, epochs=10, warmup_epochs=warmup)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    ramp, decay = rates[: warmup + 1], rates[warmup:]
    assert ramp == pytest.approx([(i + 1) / (warmup + 1) for i in range(warmup + 1)])
    assert decay[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))  # the cosine falls
    assert decay[-1] < 0.1
