"""Load a CLIP/SigLIP vision tower and a causal LM with their stock transformers classes and compose an MM-GEM.

The components are loaded once and become the MM-GEM's submodules (the MM-GEM shell is built on the meta device),
so the conversion holds one copy of the weights. Before anything is written the composition is checked the way
transformers checks a load: no missing key beyond MM-GEM's new heads, only known-unused source keys left out, and the
vision outputs and text-only LM logits equal the source components' on random inputs.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from mmgem.build import image_processor_for
from modeling_mmgem.configuration_mmgem import MMGEMConfig
from modeling_mmgem.modeling_mmgem import MMGEMModel
from modeling_mmgem.processing_mmgem import MMGEMProcessor, add_mmgem_special_tokens

logger = logging.getLogger("mmgem.conversion")

# MM-GEM modules that the components do not provide: initialised here, trained later.
NEW_HEADS = ("image_projection", "visual_token_projection", "text_projection", "logit_scale")


@dataclass(frozen=True)
class VisionFamily:
    """How to load one family of vision towers: the tower class, the full two-tower class, the PIL image processor."""

    tower_class: str
    full_class: str
    image_processor_class: str


# Keyed by the tower's model_type; the full two-tower model_type maps here through FULL_MODEL_TYPES.
VISION_FAMILIES = {
    "clip_vision_model": VisionFamily("CLIPVisionModel", "CLIPModel", "CLIPImageProcessorPil"),
    "siglip_vision_model": VisionFamily("SiglipVisionModel", "SiglipModel", "SiglipImageProcessorPil"),
}
FULL_MODEL_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------- small helpers
@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report while loading a component: the conversion checks the keys itself."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def parse_dtype(dtype: str | torch.dtype | None, argument: str = "dtype") -> torch.dtype | None:
    """None / "auto" (keep the components' dtype) or a float dtype name -> torch dtype or None."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"`{argument}` must be 'auto' or one of {sorted(DTYPES)}; got {dtype!r}.")


def _caused_by(error: BaseException, types: tuple[type[BaseException], ...]) -> bool:
    """Whether `error` or an exception it was raised from is one of `types` (transformers wraps Hub errors)."""
    while error is not None:
        if isinstance(error, types):
            return True
        error = error.__cause__ or error.__context__
    return False


def load_config(path: str, argument: str) -> PretrainedConfig:
    """AutoConfig of a Hub id or local folder, with an error that names the argument when there is none."""
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:
        if _caused_by(error, (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError, HFValidationError)):
            raise ValueError(
                f"`{argument}` {path!r} is neither a local model folder nor a model repo on the Hub you can read "
                "(check the name, and the token for a private repo)."
            ) from error
        raise ValueError(f"`{argument}` {path!r} has no usable config.json: {error}") from error


def _grid_side(value: Any, name: str, argument: str) -> int:
    """An int image/patch size, or a [h, w] pair that must be square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{argument} has a non-square `{name}` {list(value)}: MM-GEM needs a square patch grid.")
        value = value[0]
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument} has no integer `{name}` (got {value!r}): MM-GEM needs a ViT-like tower.")
    return value


def check_square_grid(vision_config: PretrainedConfig, argument: str) -> int:
    """The side of the tower's patch grid; a ValueError naming `argument` (e.g. "vision_model 'path'") unless the
    grid is square."""
    size = _grid_side(getattr(vision_config, "image_size", None), "image_size", argument)
    patch = _grid_side(getattr(vision_config, "patch_size", None), "patch_size", argument)
    if size % patch:
        raise ValueError(
            f"{argument} has image_size {size} and patch_size {patch}: {size}/{patch} is not a whole number, so the "
            "patches do not form a square grid."
        )
    return size // patch


# ---------------------------------------------------------------------------------------------- vision tower
@dataclass
class VisionSource:
    """A resolved vision component: its tower config and how its checkpoint is laid out."""

    path: str
    source_config: PretrainedConfig  # the config as stored (full model or tower)
    tower_config: PretrainedConfig  # the tower config MM-GEM uses (SigLIP: vision_use_head=False)
    family: VisionFamily

    @property
    def is_full_model(self) -> bool:
        return self.source_config is not self.tower_config and self.source_config.model_type in FULL_MODEL_TYPES


def resolve_vision(path: str, argument: str = "vision_model") -> VisionSource:
    """Read the config of a full CLIP/SigLIP model or a vision-only one (no weights) and check it fits MM-GEM."""
    config = load_config(path, argument)
    model_type = config.model_type
    if model_type in FULL_MODEL_TYPES:
        tower_config = copy.deepcopy(config.vision_config)
    elif model_type in VISION_FAMILIES:
        tower_config = copy.deepcopy(config)
    else:
        kinds = ", ".join(sorted([*FULL_MODEL_TYPES, *VISION_FAMILIES]))
        raise ValueError(
            f"`{argument}` {path!r} is not a supported vision model: its model_type is {model_type!r}; expected a "
            f"full CLIP/SigLIP model or its vision tower ({kinds})."
        )
    check_square_grid(tower_config, f"`{argument}` {path!r}")
    if tower_config.model_type == "siglip_vision_model":
        tower_config.vision_use_head = False  # MM-GEM pools patch tokens; the attention-pooling head is unused
    return VisionSource(path, config, tower_config, VISION_FAMILIES[tower_config.model_type])


def _source_architecture(source: VisionSource) -> Any:
    """The transformers class the source checkpoint was saved from (to know which of its keys MM-GEM drops)."""
    names = list(getattr(source.source_config, "architectures", None) or [])
    default = source.family.full_class if source.is_full_model else source.family.tower_class
    for name in [*names, default]:
        cls = getattr(transformers, name, None)
        if cls is not None and getattr(cls, "config_class", None) is type(source.source_config):
            return cls
    return getattr(transformers, default)


def droppable_vision_keys(source: VisionSource, tower: torch.nn.Module) -> set[str]:
    """Exactly the source keys the tower does not use (text tower, projections, SigLIP head), as transformers names
    them in `unexpected_keys`: the source architecture's keys, minus a leading `vision_model.`, minus the tower's."""
    cls = _source_architecture(source)
    with torch.device("meta"), quiet_transformers():
        full = cls(copy.deepcopy(source.source_config))
    keys = {re.sub(r"^vision_model\.", "", k) for k in full.state_dict()}
    return keys - set(tower.state_dict())


def load_vision_tower(source: VisionSource, dtype: torch.dtype | None) -> tuple[torch.nn.Module, list[str]]:
    """The stock tower class from the source checkpoint; returns (tower, dropped source keys)."""
    cls = getattr(transformers, source.family.tower_class)
    with quiet_transformers():
        tower, info = cls.from_pretrained(
            source.path, config=source.tower_config, dtype=dtype or "auto", output_loading_info=True
        )
    missing = sorted(info["missing_keys"])
    mismatched = sorted(str(k) for k in info["mismatched_keys"])
    unexpected = set(info["unexpected_keys"])
    droppable = droppable_vision_keys(source, tower)
    surprising = sorted(unexpected - droppable)
    if missing or mismatched or surprising:
        raise ValueError(
            f"`vision_model` {source.path!r} does not load cleanly into {cls.__name__}: missing keys {missing[:10]}, "
            f"mismatched {mismatched[:10]}, unexpected keys that are not known-unused parts {surprising[:10]}."
        )
    return tower.eval(), sorted(unexpected)


# ---------------------------------------------------------------------------------------------- language model
def resolve_language(path: str, argument: str = "language_model") -> PretrainedConfig:
    """Read and check the config of a causal LM (no weights)."""
    config = load_config(path, argument)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"`{argument}` {path!r} is not a causal language model: model_type {config.model_type!r} has no "
            "AutoModelForCausalLM class (give e.g. a Llama, TinyLlama, SmolLM or Qwen2 checkpoint)."
        )
    if config.get_text_config() is not config:
        raise ValueError(
            f"`{argument}` {path!r} is a composite (multimodal) model ({config.model_type!r}); give its language "
            "model alone."
        )
    return config


def load_tokenizer(path: str, argument: str = "language_model") -> Any:
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"`{argument}` {path!r} has no usable tokenizer files: {error}") from error


def load_language_model(path: str, config: PretrainedConfig, dtype: torch.dtype | None) -> torch.nn.Module:
    """The stock AutoModelForCausalLM; every checkpoint key must be used and none may be missing."""
    with quiet_transformers():
        model, info = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype or "auto", output_loading_info=True
        )
    problems = {k: sorted(str(x) for x in info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        raise ValueError(
            f"`language_model` {path!r} does not load cleanly into {type(model).__name__}: "
            + ", ".join(f"{k} {v[:10]}" for k, v in problems.items() if v)
        )
    return model.eval()


# ---------------------------------------------------------------------------------------------- image processor
def load_image_processor(source: VisionSource) -> Any:
    """The component's own image processor as its PIL variant (no torchvision), or a default one when it has none."""
    cls = getattr(transformers, source.family.image_processor_class)
    try:
        processor = cls.from_pretrained(source.path)
    except (OSError, ValueError) as error:
        logger.warning(
            "%s has no image processor config (%s); using the default %s preprocessing at %d px.",
            source.path,
            type(error).__name__,
            source.family.image_processor_class,
            source.tower_config.image_size,
        )
        processor = image_processor_for(source.tower_config)
    check_image_processor(processor, source.tower_config.image_size, source.path)
    return processor


def check_image_processor(image_processor: Any, image_size: int, path: str) -> None:
    """The processor must give square images of the tower's size (a 224 px processor on a 336 px tower fails)."""
    from PIL import Image

    pixel_values = image_processor(images=[Image.new("RGB", (61, 47))], return_tensors="pt")["pixel_values"]
    if tuple(pixel_values.shape[-2:]) != (image_size, image_size):
        raise ValueError(
            f"`vision_model` {path!r}: its image processor gives {tuple(pixel_values.shape[-2:])} images but the tower "
            f"takes square {image_size}x{image_size} images (MM-GEM needs a square patch grid)."
        )


# ---------------------------------------------------------------------------------------------- composition
@dataclass
class Reference:
    """Source-component outputs on random inputs, compared with the composed model's (parity)."""

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    vocab_size: int  # the LM's vocabulary before the special tokens: logits are compared on these columns
    vision_hidden: torch.Tensor | None = None
    logits: torch.Tensor | None = None


@dataclass
class Composition:
    """A composed MM-GEM, its processor and what the conversion found (for the model card and the report)."""

    model: MMGEMModel | None
    processor: MMGEMProcessor
    dropped_keys: list[str] = field(default_factory=list)
    new_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reference: Reference | None = None


def _random_inputs(tower_config: PretrainedConfig, vocab_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size = tower_config.image_size
    channels = getattr(tower_config, "num_channels", 3)
    pixel_values = torch.randn(2, channels, size, size, generator=generator)
    input_ids = torch.randint(0, vocab_size, (2, 12), generator=generator)
    return pixel_values, input_ids


@torch.no_grad()
def component_outputs(tower: torch.nn.Module, lm: torch.nn.Module, reference: Reference) -> tuple[Any, Any]:
    dtype = next(tower.parameters()).dtype
    hidden = tower(pixel_values=reference.pixel_values.to(dtype)).last_hidden_state
    logits = lm(input_ids=reference.input_ids, use_cache=False).logits[..., : reference.vocab_size]
    return hidden, logits


def unify_dtype(tower: torch.nn.Module, lm: torch.nn.Module, dtype: torch.dtype | None, notes: list[str]) -> None:
    """One dtype for the whole model (transformers loads a checkpoint in one dtype): the requested one, or the wider
    of the components' (an exact upcast) when they disagree."""
    tower_dtype, lm_dtype = next(tower.parameters()).dtype, next(lm.parameters()).dtype
    target = dtype
    if target is None and tower_dtype != lm_dtype:
        target = torch.float32  # fp16 and bf16 both convert exactly to fp32 (and fp16 <-> bf16 is lossy both ways)
        notes.append(
            f"The components have different dtypes ({tower_dtype}, {lm_dtype}); both are stored in {target} "
            "(exact upcast). Pass --dtype to choose another."
        )
        logger.warning(notes[-1])
    if target is not None:
        tower.to(target)
        lm.to(target)


def _init_new_heads(model: MMGEMModel, dtype: torch.dtype) -> list[str]:
    """Materialise MM-GEM's own modules (built on meta) with its initialisation; returns their state-dict keys."""
    keys = []
    for name in NEW_HEADS:
        module = getattr(model, name)
        module.to_empty(device="cpu")
        for submodule in module.modules():
            model._init_weights(submodule)
        module.to(dtype)
        keys += [f"{name}.{k}" for k in module.state_dict()]
    return keys


def assemble(
    tower: torch.nn.Module, lm: torch.nn.Module, tokenizer: Any, image_processor: Any, **mmgem_kwargs: Any
) -> tuple[MMGEMModel, MMGEMProcessor, list[str]]:
    """An MM-GEM whose vision tower and LM ARE the given modules (no copy), with the special tokens added."""
    config = MMGEMConfig(vision_config=tower.config, text_config=lm.config, **mmgem_kwargs)
    with torch.device("meta"), quiet_transformers():
        model = MMGEMModel(config)  # the shell: its own tower and LM are never materialised
    model.vision_model = tower
    model.language_model = lm
    new_keys = _init_new_heads(model, next(lm.parameters()).dtype)
    model.eval()
    add_mmgem_special_tokens(tokenizer, model)
    return model, make_processor(config, image_processor, tokenizer), new_keys


def make_processor(config: MMGEMConfig, image_processor: Any, tokenizer: Any) -> MMGEMProcessor:
    """The MM-GEM processor for `config` (the tokenizer must already have the special tokens)."""
    return MMGEMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        context_length=getattr(config.text_config, "max_position_embeddings", None),
    )


def check_composition(
    model: MMGEMModel,
    tower_keys: set[str],
    lm_keys: set[str],
    new_keys: list[str],
    reference: Reference,
) -> None:
    """Transformers-style checks before writing: key sets, then outputs equal the source components'."""
    expected = {f"vision_model.{k}" for k in tower_keys} | {f"language_model.{k}" for k in lm_keys}
    keys = set(model.state_dict())
    missing = keys - expected  # keys no source provides
    if missing != set(new_keys):
        raise AssertionError(
            f"Keys not from a source component beyond the new heads: {sorted(missing - set(new_keys))}"
        )
    lost = expected - keys
    if lost:
        raise AssertionError(f"Source component keys lost in the composition: {sorted(lost)[:10]}")
    hidden, logits = component_outputs(model.vision_model, model.language_model, reference)
    if not torch.equal(hidden, reference.vision_hidden):
        raise AssertionError("The composed vision tower's outputs differ from the source tower's.")
    if not torch.equal(logits, reference.logits):
        raise AssertionError(
            "The composed language model's text-only logits (original vocabulary) differ from the source LM's."
        )
    for name, tensor in model.state_dict().items():
        if tensor.device.type == "meta":
            raise AssertionError(f"{name} was never materialised.")


def compose(
    vision_model: str,
    language_model: str,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    **mmgem_kwargs: Any,
) -> Composition:
    """Load both components with their stock classes and compose an MM-GEM (new heads randomly initialised).

    Raises:
        ValueError: a component is not a CLIP/SigLIP vision model / causal LM, or has a non-square grid, or does not
            load cleanly, or `mmgem_kwargs` are invalid (all config-level problems are found before any weight loads).
    """
    vision = resolve_vision(vision_model)
    text_config = resolve_language(language_model)
    # Validate the MM-GEM options on the configs alone, before loading gigabytes.
    MMGEMConfig(
        vision_config=copy.deepcopy(vision.tower_config), text_config=copy.deepcopy(text_config), **mmgem_kwargs
    )
    tokenizer = load_tokenizer(language_model)
    image_processor = load_image_processor(vision)

    logger.info("Loading the vision tower from %s", vision_model)
    tower, dropped = load_vision_tower(vision, dtype)
    logger.info("Loading the language model from %s", language_model)
    lm = load_language_model(language_model, text_config, dtype)
    notes: list[str] = []
    unify_dtype(tower, lm, dtype, notes)

    vocab_size = lm.get_input_embeddings().weight.shape[0]
    reference = Reference(*_random_inputs(tower.config, vocab_size, seed), vocab_size=vocab_size)
    reference.vision_hidden, reference.logits = component_outputs(tower, lm, reference)
    tower_keys, lm_keys = set(tower.state_dict()), set(lm.state_dict())

    logger.info("Composing MM-GEM and adding the special tokens")
    model, processor, new_keys = assemble(tower, lm, tokenizer, image_processor, **mmgem_kwargs)
    del tower, lm
    check_composition(model, tower_keys, lm_keys, new_keys, reference)
    logger.info(
        "Parity checks passed: %d source keys dropped (%s), %d new keys (%s)",
        len(dropped),
        _summarise(dropped),
        len(new_keys),
        ", ".join(NEW_HEADS),
    )
    return Composition(model, processor, dropped, new_keys, notes, reference)


def _summarise(keys: list[str]) -> str:
    prefixes = sorted({k.split(".")[0] for k in keys})
    return ", ".join(prefixes) if prefixes else "none"
