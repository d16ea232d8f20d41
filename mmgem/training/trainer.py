"""`MMGEMTrainer`: the HF Trainer with MM-GEM's logging (the two loss terms, the temperature), the vision tower's own
learning rate, hard-negative samplers, rank-aware streaming data and the weight average in checkpoints."""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate.data_loader import IterableDatasetShard
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from mmgem.training.averaging import WeightAverage


class MMGEMTrainer(Trainer):
    """The HF Trainer, also logging the two loss terms (`loss_contrastive`, `loss_caption`) and the temperature.

    The joint loss is what is optimised; the terms are averaged over the steps since the last log and over the
    processes, like the Trainer's own `loss`.
    """

    def __init__(self, *args: Any, train_sampler: torch.utils.data.Sampler | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_sampler = train_sampler  # e.g. a HardNegativeSampler; None: the Trainer's own
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_counts: dict[str, int] = {}

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        outputs = model(**inputs)
        if model.training:
            for name in ("loss_contrastive", "loss_caption"):
                value = outputs.get(name)
                if value is not None:
                    total = self._term_sums.get(name, torch.zeros((), device=value.device))
                    self._term_sums[name] = total + value.detach().float()
                    self._term_counts[name] = self._term_counts.get(name, 0) + 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        if self.train_sampler is not None and (train_dataset is None or train_dataset is self.train_dataset):
            return self.train_sampler
        return super()._get_train_sampler(train_dataset)

    def get_train_dataloader(self) -> Any:
        # A streaming dataset reads its own part per rank (`mmgem.data.sources`); accelerate's IterableDatasetShard
        # would split it again, so it is made a pass-through (as transformers does for rank-aware samplers).
        loader = super().get_train_dataloader()
        shard = getattr(loader, "dataset", None)
        if isinstance(shard, IterableDatasetShard) and getattr(shard.dataset, "splits_by_rank", False):
            shard.num_processes, shard.process_index = 1, 0
        return loader

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with the vision tower's parameters in groups of their own learning rate
        (`vision_learning_rate_multiplier` times the others'; the schedule scales every group alike)."""
        multiplier = getattr(self.args, "vision_learning_rate_multiplier", 1.0)
        if self.optimizer is not None or multiplier == 1.0:
            return super().create_optimizer(model)
        optimizer = super().create_optimizer(model)
        vision = {id(p) for name, p in (model or self.model).named_parameters() if ".vision_model." in f".{name}"}
        groups = []
        for group in optimizer.param_groups:
            for is_vision in (False, True):
                params = [p for p in group["params"] if (id(p) in vision) == is_vision]
                if params:
                    lr = group["lr"] * (multiplier if is_vision else 1.0)
                    groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params, "lr": lr})
        optimizer.param_groups.clear()  # nothing has been stepped yet: regroup the same parameters in place
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # The weight average goes in first: the Trainer writes trainer_state.json last, which marks a checkpoint
        # complete (`mmgem.training.checkpoints.checkpoint_problem`).
        if self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, WeightAverage):
                    callback.save(folder)
        super()._save_checkpoint(model, trial)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for name in sorted(self._term_sums):
                mean = self._term_sums[name] / self._term_counts[name]
                logs[name] = self.accelerator.reduce(mean, reduction="mean").item()
            self._term_sums.clear()
            self._term_counts.clear()
            scale = self._logit_scale()
            if scale is not None:
                logs["logit_scale"] = scale
        super().log(logs, start_time)

    def _logit_scale(self) -> float | None:
        model = self.accelerator.unwrap_model(self.model)
        model = model.get_base_model() if hasattr(model, "get_base_model") else model
        module = getattr(model, "logit_scale", None)
        module = getattr(module, "original_module", module)  # PEFT's modules_to_save wrapper
        log_value = getattr(module, "log_value", None)
        if log_value is None or log_value.numel() != 1:  # sharded (FSDP): skip
            return None
        return float(module().detach())
