"""PEFT's common adapter tests run against MM-GEM, as PEFT runs them against the decoder models it ships.

The tests are PEFT's own (`PeftCommonTester` and the test methods of its `tests/test_decoder_models.py`), taken from
the sdist of the installed peft release at test time (see tests/peft_suite.py). Each upstream test method that is
parametrized over PEFT's decoder models runs here with one model, a tiny random MM-GEM, and PEFT's own configurations
of the methods listed in `METHODS`. What is not run, and why, is listed in `NOT_RUN` (upstream test methods) and in
PEFT's own skips (reported by pytest with their reasons).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import types
import uuid
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

from modeling_mmgem.modeling_mmgem import MMGEMModel
from tests.peft_suite import PACKAGE, import_upstream

pytestmark = pytest.mark.slow

# PEFT's own test utilities import `datasets` (our extra `data`); without it the tier cannot be imported.
pytest.importorskip("datasets", reason="PEFT's test utilities import datasets: pip install -e '.[data]'")
upstream = import_upstream("test_decoder_models")
PeftCommonTester = sys.modules[f"{PACKAGE}.testing_common"].PeftCommonTester

# The adapter methods run: LoRA (with aLoRA and trainable tokens, as PEFT configures them), IA3, prefix tuning,
# prompt tuning and P-tuning (PromptEncoder).
METHODS = (LoraConfig, IA3Config, PrefixTuningConfig, PromptTuningConfig, PromptEncoderConfig)
# PEFT picks default target modules by model_type, and "mmgem" is not in its table: MM-GEM's are those PEFT uses for
# Llama, on the language model only (the CLIP vision tower has modules of the same names).
NOT_VISION = {"exclude_modules": r"vision_model\..*"}
DEFAULT_TARGETS = {
    LoraConfig: {"target_modules": ["q_proj", "v_proj"], **NOT_VISION},
    IA3Config: {
        "target_modules": ["k_proj", "v_proj", "down_proj"],
        "feedforward_modules": ["down_proj"],
        **NOT_VISION,
    },
}
# Upstream test methods not run, with the reason. Those not parametrized over the decoder models each load a named
# Hub model (OPT, Mistral, GPT-2, Llama...) that no test here may download, and test PEFT against that model.
NOT_RUN = {
    name: "loads a named model from the Hub instead of the parametrized one"
    for name, member in vars(upstream.TestDecoderModels).items()
    if name.startswith("test_")
    and not any(mark.name == "parametrize" and mark.args[0] == "model_id" for mark in getattr(member, "pytestmark", []))
} | {"test_prompt_learning_with_gradient_checkpointing": "trains on a dataset downloaded from the Hub"}
# Upstream tests that run but are skipped here, with the reason.
SKIPPED = {
    "test_generate_with_mixed_adapter_batches": "reads `model.config.eos_token_id`, which a composite vision-language "
    "config does not define in transformers 5 (LlavaConfig neither); MM-GEM's is in `config.text_config` and in the "
    "generation config",
}
# The tiny model's folder: its path is the model id (PEFT's tests also load its tokenizer by that id).
MODEL_FOLDER = Path(tempfile.gettempdir()) / f"mmgem-peft-common-{uuid.uuid4().hex[:12]}"


def _configs() -> tuple[list, list[str]]:
    configs, ids = [], []
    for config_class, kwargs in upstream.ALL_CONFIGS:
        if config_class not in METHODS:
            continue
        kwargs = dict(kwargs)
        if "target_modules" in kwargs and kwargs["target_modules"] is None:
            kwargs.update(DEFAULT_TARGETS[config_class])
        configs.append((config_class, kwargs))
        ids.append(f"{config_class.__name__}-{sum(i.startswith(config_class.__name__) for i in ids)}")
    return configs, ids


CONFIGS, CONFIG_IDS = _configs()


def _retargeted(test: types.FunctionType) -> types.FunctionType:
    """The upstream test function with its model and configuration parameters replaced by ours."""
    marks = []
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize" and mark.args[0] == "model_id":
            mark = pytest.mark.parametrize("model_id", [str(MODEL_FOLDER)], ids=["mmgem-tiny"]).mark
        elif mark.name == "parametrize" and mark.args[0] == "config_cls,config_kwargs":
            mark = pytest.mark.parametrize("config_cls,config_kwargs", CONFIGS, ids=CONFIG_IDS).mark
        marks.append(mark)
    if test.__name__ in SKIPPED:
        marks.append(pytest.mark.skip(reason=SKIPPED[test.__name__]).mark)
    copy = types.FunctionType(test.__code__, test.__globals__, test.__name__, test.__defaults__, test.__closure__)
    copy.__dict__.update(test.__dict__)
    copy.pytestmark = marks
    return copy


class _TinyMMGEM:
    """`transformers_class` of the tests: `from_pretrained` loads MM-GEM (the installed classes)."""

    @staticmethod
    def from_pretrained(model_id: str, *args, **kwargs) -> MMGEMModel:
        return MMGEMModel.from_pretrained(model_id, *args, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def tiny_folder():
    from mmgem.build import DEFAULT_CORPUS, build_mmgem, tiny_configs, train_tokenizer

    # The tiny preset at width 64 with 4 key-value heads: PEFT's weighted-adapter tests combine LoRA ranks up to 20,
    # more than the 16 outputs of the 32-wide preset's v_proj.
    torch.manual_seed(0)
    vision_config, text_config = tiny_configs(hidden=64)
    text_config["num_key_value_heads"] = 4
    tokenizer = train_tokenizer(DEFAULT_CORPUS, vocab_size=300, model_max_length=256)
    model, processor = build_mmgem(vision_config, text_config, tokenizer, pool_grid_size=2, projection_dim=32)
    model.save_pretrained(MODEL_FOLDER)
    processor.save_pretrained(MODEL_FOLDER)
    yield MODEL_FOLDER
    shutil.rmtree(MODEL_FOLDER, ignore_errors=True)


_members = {
    name: (_retargeted(member) if name not in NOT_RUN else None)  # None: not collected
    for name, member in vars(upstream.TestDecoderModels).items()
    if name.startswith("test_")
}
TestMMGEMPeftCommon = type(
    "TestMMGEMPeftCommon",
    (upstream.TestDecoderModels,),
    {**_members, "transformers_class": _TinyMMGEM, "__module__": __name__},
)
TestMMGEMPeftCommon.__doc__ = "PEFT's decoder-model tests (its sdist) on a tiny random MM-GEM."
assert issubclass(TestMMGEMPeftCommon, PeftCommonTester)
