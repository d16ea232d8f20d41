"""Marks used by transformers' common test files (their own conftest.py is not in the sdist)."""

TRANSFORMERS_MARKS = (
    "flash_attn_test",
    "flash_attn_3_test",
    "flash_attn_4_test",
    "torch_compile_test",
    "torch_export_test",
    "generate",
    "is_training_test",
    "bitsandbytes",
    "flax",
    "is_pipeline_test",
    "is_staging_test",
    "accelerate_tests",
    "agent_tests",
    "not_device_test",
    "training_ci",
)


def pytest_configure(config):
    for mark in TRANSFORMERS_MARKS:
        config.addinivalue_line("markers", f"{mark}: a mark of transformers' common tests")
