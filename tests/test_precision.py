"""Training numerics per part (`mmgem.training.precision`): bf16 autocast for the two towers alone, the attention
kernels, and their checks through `train`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from mmgem.build import tiny_mmgem
from mmgem.training.precision import cpu_has_native_bf16, tower_autocast, towers
from mmgem.training.train import train

pytestmark = pytest.mark.fast


def _batch(processor):
    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "white")]
    return processor(images=images, text=["a red square", "a blue circle", "a white star"])


def _linear_output_dtypes(model, batch):
    """The output dtype of every Linear in one forward, by module name; and the loss."""
    seen = {}

    def record(name):
        def hook(_module, _inputs, output):
            seen.setdefault(name, output.dtype)  # returns None: the output is left as it is

        return hook

    hooks = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    try:
        loss = model(**batch).loss
    finally:
        for hook in hooks:
            hook.remove()
    return seen, loss


def test_only_the_towers_compute_in_bf16_and_the_model_is_restored_after():
    torch.manual_seed(0)
    model, processor = tiny_mmgem()
    batch = _batch(processor)
    before, fp32_loss = _linear_output_dtypes(model, batch)
    assert set(before.values()) == {torch.float32}

    with tower_autocast(model, "bfloat16"):
        inside, loss = _linear_output_dtypes(model, batch)
        loss.backward()
    in_towers = {name for name in inside if name.startswith(("vision_model.", "language_model.model."))}
    assert {name.split(".")[0] for name in in_towers} == {"vision_model", "language_model"}
    assert {inside[name] for name in in_towers} == {torch.bfloat16}
    # The LM head and the projections h1, h2, h3 stay in fp32 (as do pooling and the losses).
    outside = {name: dtype for name, dtype in inside.items() if name not in in_towers}
    assert "language_model.lm_head" in outside and "text_projection.layers.0" in outside
    assert set(outside.values()) == {torch.float32}
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(fp32_loss.item(), rel=0.05)
    # Every parameter and its gradient, hence the optimizer, stay in fp32.
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    assert all("forward" not in tower.__dict__ for tower in towers(model).values())  # the class's forward again
    after, after_loss = _linear_output_dtypes(model, batch)
    assert set(after.values()) == {torch.float32} and torch.equal(after_loss, fp32_loss)


def test_an_instance_forward_set_by_someone_else_is_put_back_and_none_changes_nothing():
    model, _ = tiny_mmgem()
    tower = towers(model)["vision"]
    theirs = tower.forward
    tower.forward = theirs  # as accelerate's hooks do: a forward on the instance
    with tower_autocast(model, "bfloat16"):
        assert tower.forward is not theirs
    assert tower.__dict__["forward"] is theirs
    with tower_autocast(model, None):
        assert tower.__dict__["forward"] is theirs


def test_the_autocast_is_put_back_when_the_block_fails():
    model, _ = tiny_mmgem()
    with pytest.raises(RuntimeError, match="stop"), tower_autocast(model, "bfloat16"):
        raise RuntimeError("stop")
    assert all("forward" not in tower.__dict__ for tower in towers(model).values())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from mmgem.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("data") / "shapes", 8, 2, 2, image_size=32, seed=1, progress=False)


def test_train_with_eager_attention_and_bf16_towers(dataset, tmp_path):
    result = train(
        from_scratch="tiny",
        data=str(dataset["train"]),
        output_dir=str(tmp_path / "out"),
        stage=2,
        max_steps=2,
        per_device_train_batch_size=4,
        save_strategy="no",
        disable_tqdm=True,
        attn_implementation="eager",
        tower_autocast_dtype="bfloat16",
    )
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    assert losses and all(loss == loss and loss < 100 for loss in losses)
    model = result.model
    assert model.config._attn_implementation == "eager"
    assert model.vision_model.config._attn_implementation == "eager"
    assert all("forward" not in tower.__dict__ for tower in towers(model).values())
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(tower_autocast_dtype="int8"), "`tower_autocast_dtype` must be one of"),
        (dict(tower_autocast_dtype="bf16"), "`tower_autocast_dtype` must be one of"),
        (dict(attn_implementation="kernels-community/flash-attn"), "`attn_implementation` must be one of"),
        (dict(attn_implementation="fast"), "`attn_implementation` must be one of"),
    ],
)
def test_bad_precision_options_are_refused_before_work(dataset, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        train(from_scratch="tiny", data=str(dataset["train"]), output_dir=str(tmp_path / "out"), **options)
    assert not (tmp_path / "out").exists()


def test_cpu_has_native_bf16_agrees_with_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("the CPU flags are read from /proc/cpuinfo, which this platform does not have")
    flags = set(cpuinfo.read_text().split())
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_tile"})


def test_the_towers_are_found_under_a_peft_wrapper():
    from mmgem.integrations.lora import apply_lora

    model, _ = tiny_mmgem()
    wrapped = apply_lora(model, r=4)
    assert towers(wrapped)["vision"] is model.vision_model
    assert towers(wrapped)["language"] is model.language_model.get_decoder()
