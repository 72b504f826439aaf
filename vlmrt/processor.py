"""Image and prompt preprocessing, driven by a family's `ProcessorSpec`.

A spec is plain data (it is written into export manifests), so an exported model is processed
exactly like the model it came from, with no model code.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vlmrt.errors import VlmrtError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ChatTemplate:
    """A family's conversation format, as plain data (it goes into export manifests with the spec).

    ```
     [system block] (user block | assistant block)* user block  generation
      system.format(content=...)       image + text in the user turn that holds the image
    ```
    Each block is a format string with `{content}`. `system` None: the release has no system role
    (a system message is refused). `image` goes before the text of the user turn holding the image
    and contains the spec's `image_placeholder`, once per image of that turn; `{n}` in it becomes the
    image's number within its turn, from 1 (Qwen-VL's `Picture {n}:`). A single turn renders exactly
    as `template`.
    """

    user: str
    assistant: str
    generation: str  # what opens the answer: the prompt ends with it
    image: str
    system: str | None = None
    default_system: str = ""  # rendered when the conversation has no system message ("" = no block)


@dataclass(frozen=True)
class Conversation:
    """Turns of a chat, for `Processor.render`: roles "user"/"assistant", the last one "user".

    Args:
        turns: (role, text) pairs in order.
        system: the system message (None: the family's default).
        image_turn: index in `turns` of the user turn holding the image (-1: none, text only).
        image_turns: for several images, the index in `turns` of each image's user turn, in image
            order (a turn with two images appears twice); when given, `image_turn` is not read.
    """

    turns: tuple[tuple[str, str], ...]
    system: str | None = None
    image_turn: int = -1
    image_turns: tuple[int, ...] = ()

    @property
    def num_images(self) -> int:
        return len(self.image_turns) if self.image_turns else int(self.image_turn >= 0)

    def images_in(self, turn: int) -> int:
        """How many images the turn at index `turn` holds."""
        return self.image_turns.count(turn) if self.image_turns else int(turn == self.image_turn)

    def __contains__(self, text: str) -> bool:  # a family's check for markup in the user's text
        return any(text in t for _, t in self.turns) or (self.system is not None and text in self.system)

    def render(self, chat: ChatTemplate | None) -> str:
        """The whole prompt in the family's format, ending with the opening of the answer."""
        if chat is None:
            raise VlmrtError("this model has no conversation template; send one user message with the question")
        if self.system is not None and chat.system is None:
            raise VlmrtError("this model's conversation template has no system role (the release has none); put "
                             "the instruction in the first user message")
        if not self.turns or self.turns[-1][0] != "user":
            raise VlmrtError("the conversation must end with a user message")
        system = chat.default_system if self.system is None else self.system
        out = [chat.system.format(content=system)] if chat.system is not None and system else []
        for i, (role, text) in enumerate(self.turns):
            if role not in ("user", "assistant"):
                raise VlmrtError(f"unknown role {role!r} in the conversation; use user or assistant")
            if self.images_in(i) and role != "user":
                raise VlmrtError("an image can only be in a user message")
            markup = "".join(chat.image.replace("{n}", str(k + 1)) for k in range(self.images_in(i)))
            content = markup + text
            out.append((chat.user if role == "user" else chat.assistant).format(content=content))
        return "".join(out) + chat.generation


@dataclass(frozen=True)
class ProcessorSpec:
    """Everything needed to turn (image, question) into model inputs, and output ids into an answer.

    `template` holds `{prompt}` for the user's question and `image_placeholder` where the image
    goes; the placeholder expands to `num_image_tokens` copies of `image_token_id`. Text segments
    between placeholders are tokenized separately, the first with BOS when `add_bos` (MiniGPT-4's
    rule), so ids match the release token for token.
    """

    image_size: int
    template: str
    image_placeholder: str
    image_token_id: int
    num_image_tokens: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: str = "bicubic"
    add_bos: bool = True
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[tuple[int, ...], ...] = ()
    # "module:function(processor, images, prompts) -> batch" for families whose image becomes a
    # variable number of tokens (MiniCPM-V-2's slicing); "" = the square resize above
    batch_hook: str = ""
    hook_options: tuple[tuple[str, object], ...] = ()  # (name, value) pairs the hook reads: plain data
    chat: ChatTemplate | None = None  # multi-turn conversations (None: one question per prompt only)
    max_images: int = 1  # images one prompt may hold (each its own markup and features; see Processor)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ProcessorSpec":
        d = dict(d)
        d["chat"] = ChatTemplate(**d["chat"]) if d.get("chat") else None
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        d["stop_strings"] = tuple(d.get("stop_strings", ()))
        d["stop_token_ids"] = tuple(tuple(s) for s in d.get("stop_token_ids", ()))
        d["hook_options"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in d.get("hook_options", ()))
        return cls(**d)


def load_image(source):
    """Open an image file (or take a PIL image) and return it as 8-bit RGB.

    RGBA/LA are composited on white; grayscale, palette, CMYK and 16/32-bit images are converted.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        img = source
    else:
        path = Path(source)
        if not path.exists():
            raise VlmrtError(f"image not found: {path} (check the path)")
        if path.is_dir():
            raise VlmrtError(f"{path} is a folder, not an image file")
        try:
            img = Image.open(path)
            img.load()
        except UnidentifiedImageError:
            raise VlmrtError(f"{path} is not an image PIL can read (expected JPEG, PNG, WebP, BMP, TIFF ...)") from None
        except OSError as e:
            raise VlmrtError(f"cannot read image {path}: {e}") from None
    return to_rgb(img)


def to_rgb(img):
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # high bit depth: rescale to 8 bits
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def image_to_pixels(img, spec: ProcessorSpec) -> torch.Tensor:
    """RGB PIL image -> pixel_values [3,S,S], resized to exactly S x S (no crop), normalized."""
    from PIL import Image

    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[spec.resample]
    img = img.resize((spec.image_size, spec.image_size), resample)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3,S,S]
    mean = torch.tensor(spec.mean)[:, None, None]
    std = torch.tensor(spec.std)[:, None, None]
    return (x - mean) / std


class Processor:
    """Turns images and questions into a left-padded batch, per a `ProcessorSpec`."""

    def __init__(self, spec: ProcessorSpec, tokenizer):
        self.spec = spec
        self.tokenizer = tokenizer
        # left padding must not look like an image placeholder (Llama's pad is often <unk>, the
        # placeholder MiniGPT-4 uses), or the embedding stage would count it as an image slot
        candidates = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, spec.image_token_id + 1)
        self.pad_token_id = next(i for i in candidates if i is not None and i != spec.image_token_id)

    def render(self, prompt: "str | Conversation") -> str:
        """The prompt in the model's template: a question (one turn) or a whole `Conversation`."""
        if isinstance(prompt, Conversation):
            return prompt.render(self.spec.chat)
        if not prompt or not prompt.strip():
            raise VlmrtError("the prompt is empty; pass a question, e.g. --prompt 'Describe this image.'")
        return self.spec.template.replace("{prompt}", prompt)

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of one rendered prompt, with image placeholders expanded."""
        spec = self.spec
        segments = self.render(prompt).split(spec.image_placeholder)
        ids: list[int] = []
        for i, seg in enumerate(segments):
            if i > 0:
                ids += [spec.image_token_id] * spec.num_image_tokens
            if i == 0 and spec.add_bos and self.tokenizer.bos_token_id is not None:
                ids.append(self.tokenizer.bos_token_id)
            if seg:
                ids += self.tokenizer(seg, add_special_tokens=False).input_ids
        return ids

    def text_ids(self, prompt: "str | Conversation") -> list[int]:
        """Token ids of a prompt without an image (a question becomes a one-turn conversation)."""
        if not isinstance(prompt, Conversation):
            if not prompt or not prompt.strip():
                raise VlmrtError("the prompt is empty; pass a question, e.g. --prompt 'Describe this image.'")
            prompt = Conversation((("user", prompt),))
        text = self.render(prompt)
        if self.spec.image_placeholder in text:
            raise VlmrtError(f"the text holds the image placeholder {self.spec.image_placeholder!r} but no image "
                             "was given; remove it or add an image")
        bos = [self.tokenizer.bos_token_id] if self.spec.add_bos and self.tokenizer.bos_token_id is not None else []
        return bos + self.tokenizer(text, add_special_tokens=False).input_ids

    def __call__(self, images: list, prompts: list[str]) -> dict:
        """Returns input_ids [B,T] (left-padded), attention_mask [B,T], pixel_values [B,3,S,S].

        A row's image may be a list of images (a batch of one row only): see `several_images`."""
        if len(images) != len(prompts):
            raise VlmrtError(f"got {len(images)} images for {len(prompts)} prompts; give one image per prompt")
        if any(isinstance(im, (list, tuple)) for im in images):
            if len(images) != 1:
                raise VlmrtError("several images per prompt are taken in a batch of one prompt only; send the "
                                 "prompts one by one")
            return self.several_images(list(images[0]), prompts[0])
        if all(im is None for im in images):  # text only: no vision inputs at all
            return self.left_pad([self.text_ids(p) for p in prompts])
        if any(im is None for im in images):
            raise VlmrtError("a batch mixes rows with and without an image; run text-only prompts apart")
        if self.spec.batch_hook:
            return self._hook(images, prompts)
        pixels = torch.stack([image_to_pixels(load_image(im), self.spec) for im in images])
        return {**self.left_pad([self.prompt_ids(p) for p in prompts]), "pixel_values": pixels}

    def several_images(self, images: list, prompt: "str | Conversation") -> dict:
        """One prompt with N images, each in the family's markup in its own user turn (a question:
        all in its one turn) -> input_ids [1,T], attention_mask [1,T], pixel_values [N,3,S,S]; the
        embedding stage takes the N images' features as one row, [1,N*Q,D], filled in order. A
        family's batch hook gets the list as the row's image (and may add `image_tokens` [N]: how
        many of each image's features are real, the rest being padding)."""
        spec = self.spec
        if len(images) > spec.max_images:
            raise VlmrtError(f"got {len(images)} images for one prompt; this model takes at most {spec.max_images} "
                             f"image{'s' if spec.max_images > 1 else ''} per prompt")
        if len(images) == 1 and not isinstance(prompt, Conversation):
            return self([images[0]], [prompt])
        if not isinstance(prompt, Conversation):
            if not prompt or not prompt.strip():
                raise VlmrtError("the prompt is empty; pass a question, e.g. --prompt 'Describe this image.'")
            prompt = Conversation((("user", prompt),), image_turns=(0,) * len(images))
        if prompt.num_images != len(images):
            raise VlmrtError(f"the conversation places {prompt.num_images} images but {len(images)} were given; "
                             "give one image per image_turns entry")
        if len(images) == 1:
            return self([images[0]], [prompt])
        if spec.batch_hook:  # the hook takes the row's list of images itself
            return self._hook([list(images)], [prompt])
        pixels = torch.stack([image_to_pixels(load_image(im), spec) for im in images])  # [N,3,S,S]
        return {**self.left_pad([self.prompt_ids(prompt)]), "pixel_values": pixels}

    def _hook(self, images: list, prompts: list) -> dict:
        """The family builds the batch (and may add named vision inputs)."""
        import importlib

        module, func = self.spec.batch_hook.split(":")
        return getattr(importlib.import_module(module), func)(self, images, prompts)

    def left_pad(self, rows: list[list[int]]) -> dict:
        """Token id rows -> input_ids [B,T] left-padded with `pad_token_id`, attention_mask [B,T]."""
        t = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), t), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), t), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, t - len(r):] = torch.tensor(r)
            attention_mask[i, t - len(r):] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
