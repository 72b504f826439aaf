"""Conversations in each family's own format (ChatTemplate): one turn renders exactly as the
single-question template, history and system messages as the releases lay them out, and a
text-only conversation runs on the engine for every family."""

import pytest

from conftest import load_tiny
from vlmrt.engine import Engine, Request
from vlmrt.errors import VlmrtError
from vlmrt.models import all_presets
from vlmrt.pipeline import Pipeline
from vlmrt.processor import Conversation, Processor, ProcessorSpec

TINY = sorted(k for k in all_presets() if k.endswith("-tiny"))
HISTORY = Conversation((("user", "q1"), ("assistant", "a1"), ("user", "q2")), image_turn=0)

pytestmark = pytest.mark.usefixtures("one_thread")


def processor(preset: str) -> Processor:
    m = load_tiny(preset)
    return Processor(m.spec, m.tokenizer)


@pytest.mark.parametrize("preset", TINY)
def test_one_turn_with_the_image_renders_as_the_single_question_template(preset):
    p = processor(preset)
    assert p.render(Conversation((("user", "Describe it."),), image_turn=0)) == p.render("Describe it.")
    assert ProcessorSpec.from_dict(p.spec.to_dict()) == p.spec  # the chat template travels in manifests


SYSTEM_MINIGPT4 = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
                   "provide it to you. Please answer my questions.")
EXPECTED = {  # the release's own layouts of q1 (with the image), a1, q2 (SPEC 1.8, 2.6, 3.6; Qwen2-VL template)
    "minigpt4-tiny": SYSTEM_MINIGPT4 + "###Human: <Img><ImageHere></Img> q1###Assistant: a1###Human: q2###Assistant: ",
    "minigpt4-llama2-tiny": SYSTEM_MINIGPT4 + "<s>[INST] <Img><ImageHere></Img> q1 [/INST] a1<s>[INST] q2 [/INST] ",
    "minicpm-v-tiny": "<用户>(<image>./</image>)\nq1<AI>a1<用户>q2<AI>",
    "qwen-vl-tiny": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nPicture 1: "
                    "<img>{image}</img>\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\nq2"
                    "<|im_end|>\n<|im_start|>assistant\n",
    "slimm-tiny": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                  "<|image_pad|><|vision_end|>q1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\n"
                  "q2<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.mark.parametrize("preset", TINY)
def test_history_renders_in_the_release_s_layout(preset):
    assert processor(preset).render(HISTORY) == EXPECTED[preset]


@pytest.mark.parametrize("preset", ["minigpt4-tiny", "qwen-vl-tiny", "slimm-tiny"])
def test_a_system_message_replaces_the_default_one(preset):
    p = processor(preset)
    text = p.render(Conversation((("user", "q"),), system="Be brief."))
    assert "Be brief." in text and "You are a helpful assistant." not in text and SYSTEM_MINIGPT4 not in text


def test_a_family_without_a_system_role_refuses_one():
    with pytest.raises(VlmrtError, match="no system role"):
        processor("minicpm-v-tiny").render(Conversation((("user", "q"),), system="Be brief."))


def test_a_conversation_must_end_with_the_user():
    with pytest.raises(VlmrtError, match="end with a user message"):
        processor("minigpt4-tiny").render(Conversation((("user", "q"), ("assistant", "a"))))


@pytest.mark.parametrize("preset", TINY)
def test_text_only_runs_on_the_engine_for_every_family(preset):
    pipe = Pipeline(load_tiny(preset))
    conv = Conversation((("user", "Hello."), ("assistant", "Hi."), ("user", "How are you?")))
    ids = pipe.processor.text_ids(conv)
    assert pipe.processor.spec.image_token_id not in ids
    engine = Engine(pipe.runtime, pipe.processor, pipe.generation_config(max_new_tokens=2))
    state, = engine.run([Request(conv)])
    assert state.length == len(ids) and len(state.row.tokens) == 2
