"""One entry per registered family (vlmrt.models.FAMILIES): its tiny preset and the prompts the
shared tests use. tests/test_registry.py checks that the two tables have the same keys."""

FAMILY_TESTS = {
    "minicpmv": {"tiny": "minicpm-v-tiny"},
    "minigpt4": {"tiny": "minigpt4-tiny"},
    "qwen_vl": {"tiny": "qwen-vl-tiny"},
    "slimm": {"tiny": "slimm-tiny"},
}
