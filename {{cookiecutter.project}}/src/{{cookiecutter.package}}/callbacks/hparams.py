"""The run's resolved config in TensorBoard's HPARAMS tab, beside its metrics.

Lightning's TensorBoardLogger writes an HPARAMS record only together with a metric value logged
at step 0 (`hp_metric`), which would put a made-up point on a real curve. This callback writes
the two records the hparams plugin reads per run instead: a session start with every config
value when fitting starts (a running or crashed run shows up too) and a session end with the
status when it stops. The tab takes its metric columns from the run's own scalars, so each run's
last val/loss (and every other logged value) sits beside its hyper-parameters, and the runs of a
sweep (`python train.py -m ...`) can be sorted and compared there.
"""

import time
from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import metadata
from tensorboard.plugins.hparams.api_pb2 import Status
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo, SessionStartInfo


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | float | str]:
    """{"model": {"optimizer": {"lr": 3e-4}}} -> {"model/optimizer/lr": 3e-4}; lists and None as text."""
    flat: dict[str, bool | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:  # lists, None
            flat[name] = str(value)
    return flat


def _summary(tag: str, data: HParamsPluginData) -> Summary:
    summary = Summary()
    summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR)
    return summary


def session_start(hparams: Mapping[str, bool | float | str]) -> Summary:
    info = SessionStartInfo(start_time_secs=time.time())
    for name, value in hparams.items():
        if isinstance(value, bool):  # before the number case: a bool is an int
            info.hparams[name].bool_value = value
        elif isinstance(value, int | float):
            info.hparams[name].number_value = value
        else:
            info.hparams[name].string_value = value
    return _summary(metadata.SESSION_START_INFO_TAG, HParamsPluginData(session_start_info=info))


def session_end(status: int) -> Summary:
    info = SessionEndInfo(status=status, end_time_secs=time.time())
    return _summary(metadata.SESSION_END_INFO_TAG, HParamsPluginData(session_end_info=info))


class HParamsSession(L.Callback):
    """config: the resolved run config (nested dicts); written to every TensorBoard logger."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.hparams = flatten(config)

    def _write(self, trainer: L.Trainer, summary: Summary) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment._get_file_writer()  # the run's event file
                writer.add_summary(summary)
                writer.flush()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, session_start(self.hparams))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, session_end(Status.STATUS_SUCCESS))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._write(trainer, session_end(Status.STATUS_FAILURE))
