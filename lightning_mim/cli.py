"""The ``lightning-mim`` command: a LightningCLI over lightning-mim's modules.

    lightning-mim fit --config configs/conmim_vitb.yaml --data.root /data/imagenet
    lightning-mim fit --config configs/quickstart/conmim.yaml
    lightning-mim fit --config configs/conmim_vitb.yaml --print_config

Any LightningModule / LightningDataModule can be named by ``class_path``; lightning-mim's are
importable by their short names (``ConMIMModule``, ``ImageNetDataModule``, ``SampleDataModule``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import ArgsType, LightningCLI

import lightning_mim.callbacks
import lightning_mim.data
import lightning_mim.methods  # noqa: F401 - registers the method modules

__all__ = ["LightningMIMCLI", "main"]


class LightningMIMCLI(LightningCLI):
    """LightningCLI with lightning-mim's defaults.

    Model and data are chosen in the config by ``class_path`` (subclass mode); methods configure
    their own optimiser and schedule, so the CLI's ``--optimizer`` / ``--lr_scheduler`` are off.
    The resolved config is saved next to the logs of every run.

    Example::

        cli = LightningMIMCLI(args=["--config", "configs/quickstart/conmim.yaml"], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(pl.LightningModule, pl.LightningDataModule, args=args, run=run, **kwargs)


def main(args: ArgsType = None) -> None:
    """Entry point of ``lightning-mim`` and ``python -m lightning_mim``."""
    LightningMIMCLI(args=args)


if __name__ == "__main__":
    main()
