"""A training step makes no host-device synchronisation of its own when its inputs come from the collator.

Counted on CPU with a TorchFunctionMode: every call that makes the host wait for the device on a GPU (`.item()`,
`.tolist()`, `bool()` / `int()` / `float()` of a tensor, `.cpu()` / `.to("cpu")`, `.numpy()`, `nonzero`,
boolean-mask indexing, `torch.unique`, `masked_select`) made inside the model's forward and backward, by the calling
file. On this CPU run the model's device is the host, so `.to(model.device)` is not counted. Inputs are validated
where they are made (processor, collator) and at the eager entry points (`get_*_features`, `generate`), not in the
training step (see `MMGEMModel._checks_values`).
"""

from __future__ import annotations

import collections
import traceback
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

from mmgem.build import tiny_mmgem
from mmgem.data.collator import MMGEMCollator
from modeling_mmgem.modeling_mmgem import check_token_ids

pytestmark = [pytest.mark.fast, pytest.mark.timeout(300)]

SYNCING = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.numpy,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.cpu,
    torch.unique,
    torch.Tensor.unique,
    torch.masked_select,
    torch.Tensor.masked_select,
    torch.argwhere,
}


REPO = Path(__file__).resolve().parents[1]
PROJECT = (str(REPO / "mmgem"), str(REPO / "modeling_mmgem"))  # the library and the Hub code


class SyncCounter(TorchFunctionMode):
    """Counts the calls that would synchronise with a GPU, by (function, calling file:line, made by the project)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._syncs(func, args, kwargs):
            caller = traceback.extract_stack()[-2]  # the code that called the tensor operation
            where = f"{caller.filename.rsplit('/', 1)[-1]}:{caller.lineno}"
            self.calls[(getattr(func, "__name__", str(func)), where, caller.filename.startswith(PROJECT))] += 1
        return func(*args, **kwargs)

    def ours(self) -> dict:
        """The synchronisations made by the project's own code."""
        return {key: count for key, count in self.calls.items() if key[2]}

    @staticmethod
    def _syncs(func, args, kwargs) -> bool:
        if func in SYNCING:
            return True
        if func is torch.Tensor.__getitem__:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        if func is torch.Tensor.to:  # a copy to the host named as such (on this CPU run every device is the host)
            return any(isinstance(t, str) and t == "cpu" for t in [*args[1:], *kwargs.values()])
        return False


def _batch(processor, stage: int):
    image = Image.new("RGB", (32, 32), "white")
    regions = [{"box": [0, 0, 16, 16], "caption": f"a {c} circle"} for c in ("red", "blue")]
    items = [
        {"image": image, "caption": "a small red circle", "regions": regions},
        {"image": Image.new("RGB", (40, 32), "blue"), "caption": "a blue square", "regions": regions[:1]},
    ]
    return MMGEMCollator(processor, stage=stage, seed=0)(items)


@pytest.mark.parametrize("stage", [1, 2])
def test_a_training_step_on_collated_inputs_never_waits_for_the_device(stage):
    torch.manual_seed(0)
    model, processor = tiny_mmgem()
    model.train()
    batch = _batch(processor, stage)
    model(**batch)  # first call: lazy initialisation outside the count
    counter = SyncCounter()
    with counter:
        output = model(**batch)
        output.loss.backward()
    assert output.loss_contrastive is not None and output.loss_caption is not None
    assert counter.ours() == {}
    # What remains is the stock language model's own mask building (transformers checks whether the padding mask
    # can be skipped), as in any stock LlamaForCausalLM step with padding.
    assert all(where.startswith("masking_utils.py") for _, where, _ in counter.calls), dict(counter.calls)


def test_the_counter_sees_a_synchronisation():
    """The check above can fail: `.item()`, a boolean mask and the library's own value checks are counted."""
    counter = SyncCounter()
    values = torch.arange(4.0)
    with counter:
        values.sum().item()
        values[values > 1]
        check_token_ids(torch.tensor([[1, 2]]), 10, "input_ids")  # reads the smallest and largest id
    assert sum(counter.calls.values()) == 4 and sum(counter.ours().values()) == 2
