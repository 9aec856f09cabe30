"""The plumbing every method composes: ``methods._parts`` (steps) and ``methods._state`` (checkpoints, hparams)."""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_mim._rng import CountedStream, Stream
from lightning_mim.methods._parts import LossTerms, eval_views, pick_encoder
from lightning_mim.methods._state import load_method_state, record_hparams, save_method_state
from lightning_mim.optim import OptimConfig


class Logged:
    """Stands in for a LightningModule's ``log``: name -> logged value."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def log(self, name: str, value: torch.Tensor, **kwargs: Any) -> None:
        self.values[name] = float(value)


def test_loss_terms_total_is_the_weighted_sum_and_every_term_is_logged() -> None:
    terms = LossTerms(
        {"loss_rec": torch.tensor(2.0), "loss_con": torch.tensor(3.0)},
        {"loss_rec": 0.5},  # loss_con has no weight: 1
        metrics={"accuracy": torch.tensor(0.25)},
    )
    assert terms.total.item() == 0.5 * 2.0 + 3.0
    logged = Logged()
    assert terms.log(logged, "train").item() == 4.0  # type: ignore[arg-type]
    assert logged.values == {"train/loss": 4.0, "train/loss_rec": 2.0, "train/loss_con": 3.0, "train/accuracy": 0.25}
    single = Logged()
    LossTerms({"loss": torch.tensor(7.0)}).log(single, "val")  # type: ignore[arg-type]
    assert single.values == {"val/loss": 7.0}  # a term named "loss" is the total, logged once
    with pytest.raises(ValueError, match="no terms"):
        _ = LossTerms({}).total


def test_pick_encoder_returns_the_named_encoder_or_lists_what_the_module_has() -> None:
    student, teacher = nn.Linear(2, 2), nn.Linear(2, 2)
    owner = nn.Identity()
    assert pick_encoder(owner, "teacher", student=student, teacher=teacher) is teacher
    with pytest.raises(
        ValueError, match=r"^Identity\.encoder\(which='ema'\): this module has 'student' and 'teacher'$"
    ):
        pick_encoder(owner, "ema", student=student, teacher=teacher)


def test_eval_views_crop_the_centre_above_64_px_only() -> None:
    resize = [view.transform.transforms[0].size for view in (eval_views(224), eval_views(32))]
    assert resize == [[256], [32]]  # 224 / 0.875 = 256, then a 224 centre crop; 32 px is not cropped


TOY_OPTIM = OptimConfig(lr=0.1)


class Toy(pl.LightningModule):
    def __init__(self, width: int = 4, masking: object = None, optim: OptimConfig = TOY_OPTIM) -> None:
        super().__init__()
        self.optim = record_hparams(self, optim, ignore=["masking"])


class WiderToy(Toy):
    def __init__(self, extra: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)


def test_record_hparams_keeps_the_callers_arguments_and_the_optimiser_as_plain_types() -> None:
    toy = Toy(width=8, masking=object(), optim=OptimConfig(lr=0.5, warmup_steps=7))
    assert dict(toy.hparams) == {"width": 8, "optim": dataclasses.asdict(OptimConfig(lr=0.5, warmup_steps=7))}
    assert toy.optim == OptimConfig(lr=0.5, warmup_steps=7)
    # a dict (as a checkpoint's hparams hold it) becomes the dataclass again
    assert Toy(optim=dataclasses.asdict(OptimConfig(lr=0.2))).optim == OptimConfig(lr=0.2)  # type: ignore[arg-type]
    # a subclass's own arguments are recorded beside the parent's
    assert WiderToy(extra=5, width=6).hparams["extra"] == 5 and WiderToy(width=6).hparams["width"] == 6


def test_method_state_round_trip_renames_old_keys_and_refuses_another_method() -> None:
    stream = CountedStream(Stream.STEPS)
    stream.next(0)
    stream.next(0)
    checkpoint: dict[str, Any] = {"state_dict": {"encoder.weight": torch.zeros(1), "head.weight": torch.ones(1)}}
    save_method_state(checkpoint, "cmae", streams={"step_stream": stream})
    fresh = CountedStream(Stream.STEPS)
    load_method_state(checkpoint, "cmae", {"step_stream": fresh}, renamed={"encoder.": "online_encoder."})
    assert fresh.state_dict() == stream.state_dict() == {"base": torch.initial_seed(), "count": 2}
    assert set(checkpoint["state_dict"]) == {"online_encoder.weight", "head.weight"}
    with pytest.raises(ValueError, match=r"^not a ConMIM checkpoint \(found: cmae\)"):
        load_method_state(checkpoint, "conmim")
