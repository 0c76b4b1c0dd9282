"""Pooling recipes: how a sequence's hidden states become an embedding, and which prompts wrap the input.

One registry entry per published recipe (WAVE all_layer / last_layer, Vela last_token, ALM2Vec
eos_projection); a checkpoint picks one by config, a caller may override it. Recipes are data, not
code paths: a new recipe of the same family is a new entry, not a fork.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

Head = Literal["all_layer", "last_layer", "none", "eos_projection"]
# How token states become one vector before the head: the final-norm state of the last token, or the mean of
# the final-norm states over the item's real tokens (padding excluded).
Pooling = Literal["last", "mean"]
# Decoder attention: causal (the LLM as trained) or bidirectional (encoder-style embedders).
Attention = Literal["causal", "bidirectional"]

WAVE_QA_SUFFIX = "Please respond with only the letter of the correct answer."


@dataclass(frozen=True)
class PromptConfig:
    """Templates the processor fills. `{media}` is replaced by the media placeholder tokens, `{instruction}`
    by the user's instruction (or the modality default), `{text}` by the text item. Special tokens such as
    `<|im_end|>` are written literally and recognised by the tokenizer."""

    media_template: str = "{media}{instruction}<|im_end|>"
    text_target_template: str = "{text}<|im_end|>"
    text_query_template: str = "{instruction}{text}<|im_end|>"
    default_instructions: dict[str, str] = field(
        default_factory=lambda: {
            "audio": "Please describe the audio.",
            "video": "Please describe the video.",
            "av": "Please describe the video.",
            "text": "",
        }
    )
    qa_suffix: str = WAVE_QA_SUFFIX
    # Prepended to every sequence (Vela's optional in-context examples live here).
    prefix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PromptConfig:
        return cls(**data) if data else cls()


@dataclass(frozen=True)
class Recipe:
    name: str
    # Head applied to media items and Text(side="query").
    head: Head
    # Head applied to text targets (plain str). WAVE: the raw final-layer last token.
    text_target_head: Head
    prompts: PromptConfig
    description: str = ""
    pooling: Pooling = "last"
    attention: Attention = "causal"
    # audio-visual items: "interleaved" 2 s chunks of video and audio under TMRoPE (Qwen2.5-Omni, WAVE), or
    # "separate": the video block, then the audio block, each positioned on its own (Omni-Embed-Nemotron)
    av_layout: str = "interleaved"

    def with_prompts(self, prompts: PromptConfig) -> Recipe:
        return replace(self, prompts=prompts)


WAVE_PROMPTS = PromptConfig()

VELA_PROMPTS = PromptConfig(
    media_template="{media}{instruction}",
    text_target_template="{text}\nSummarize the above sentence in one word:",
    text_query_template="{instruction}{text}\nSummarize the above sentence in one word:",
    default_instructions={
        "audio": "Summarize the caption of the audio in one word:",
        "video": "Summarize the video in one word:",
        "av": "Summarize the video in one word:",
        "text": "",
    },
)

ALM2VEC_PROMPTS = PromptConfig(
    media_template="{media}{instruction}<|endoftext|>",
    text_target_template="{text}<|endoftext|>",
    text_query_template="{instruction}{text}<|endoftext|>",
    default_instructions={"audio": "", "video": "", "av": "", "text": ""},
)

# LCO-Embedding-Omni (github.com/LCO-Embedding/LCO-Embedding README and its MTEB wrapper): the Qwen2.5-Omni chat
# template with the generation prompt, "{text}\nSummarize the above text in one word:", "\nSummarize the above
# audio in one word:", "\nSummarize the above video in one word:", final-layer last token. The system line is the
# Qwen2.5 template's default (LCO builds only a user message), not read from LCO's own chat_template file; the AV
# wording is ours (LCO feeds video without its soundtrack).
_CHAT_OPEN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
_CHAT_CLOSE = "<|im_end|>\n<|im_start|>assistant\n"
LCO_OMNI_PROMPTS = PromptConfig(
    media_template=_CHAT_OPEN + "{media}{instruction}" + _CHAT_CLOSE,
    text_target_template=_CHAT_OPEN + "{text}\nSummarize the above text in one word:" + _CHAT_CLOSE,
    text_query_template=_CHAT_OPEN + "{instruction}{text}\nSummarize the above text in one word:" + _CHAT_CLOSE,
    default_instructions={
        "audio": "\nSummarize the above audio in one word:",
        "video": "\nSummarize the above video in one word:",
        "av": "\nSummarize the above video in one word:",
        "text": "",
    },
)

# e5-omni (Haon-Chen/e5-omni-7B model card; MTEB's e5_omni wrapper): the Qwen2.5-Omni chat template with the
# generation prompt, then "<|endoftext|>", whose final-layer state is the embedding. Text queries are written
# "Query: ..."; passages and media documents carry no prefix and no instruction. Where a caller's instruction goes
# is not shown there: before "Query: ", as e5 models write "Instruct: ...\nQuery: ...".
E5_OMNI_PROMPTS = PromptConfig(
    media_template=_CHAT_OPEN + "{media}{instruction}" + _CHAT_CLOSE + "<|endoftext|>",
    text_target_template=_CHAT_OPEN + "{text}" + _CHAT_CLOSE + "<|endoftext|>",
    text_query_template=_CHAT_OPEN + "{instruction}Query: {text}" + _CHAT_CLOSE + "<|endoftext|>",
    default_instructions={"audio": "", "video": "", "av": "", "text": ""},
)

# Omni-Embed-Nemotron (nvidia/omni-embed-nemotron-3b model card): the chat template without the generation prompt
# (each message closed by "<|im_end|>\n"), text documents written "passage: ...", queries "query: ..." (the
# card's sentence-transformers prompts, as quoted second-hand), bidirectional attention, the mean of the final
# states over every token of the sequence, template tokens included.
_CHAT_END = "<|im_end|>\n"
NEMOTRON_PROMPTS = PromptConfig(
    media_template=_CHAT_OPEN + "{media}{instruction}" + _CHAT_END,
    text_target_template=_CHAT_OPEN + "passage: {text}" + _CHAT_END,
    text_query_template=_CHAT_OPEN + "{instruction}query: {text}" + _CHAT_END,
    default_instructions={"audio": "", "video": "", "av": "", "text": ""},
)

RECIPES: dict[str, Recipe] = {
    "all_layer": Recipe(
        "all_layer", "all_layer", "none", WAVE_PROMPTS,
        "WAVE: last token of every decoder layer -> Linear(L*D, D) -> GELU -> Linear(D, D)",
    ),
    "last_layer": Recipe(
        "last_layer", "last_layer", "none", WAVE_PROMPTS,
        "WAVE variant: final-layer last token -> Linear(D, D) -> GELU -> Linear(D, D)",
    ),
    "last_token": Recipe(
        "last_token", "none", "none", WAVE_PROMPTS,
        "final-layer last token, no head (Vela; also a plain thinker)",
    ),
    "eos_projection": Recipe(
        "eos_projection", "eos_projection", "eos_projection", ALM2VEC_PROMPTS,
        "ALM2Vec: appended EOS token, hidden state at EOS -> Linear projection",
    ),
    "lco_omni": Recipe(
        "lco_omni", "none", "none", LCO_OMNI_PROMPTS,
        "LCO-Embedding-Omni: chat template + 'in one word' prompt, final-layer last token",
    ),
    "e5_omni": Recipe(
        "e5_omni", "none", "none", E5_OMNI_PROMPTS,
        "e5-omni: appended <|endoftext|>, final-layer last token",
    ),
    "mean_bidirectional": Recipe(
        "mean_bidirectional", "none", "none", NEMOTRON_PROMPTS,
        "Omni-Embed-Nemotron: bidirectional attention, mean of the final-norm states over the item's tokens",
        pooling="mean", attention="bidirectional", av_layout="separate",
    ),
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}") from None
