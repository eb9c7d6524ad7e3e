"""A text codec built from a model directory's tokenizer files without transformers.

The ingest tokenizes every request but never runs the model: importing transformers (and the
torch it pulls in) made it start seconds slower and hold hundreds of MB for nothing. This
codec reads ``tokenizer.json`` with the ``tokenizers`` package (the Rust tokenizer that
transformers' own fast tokenizers wrap), the special tokens from ``tokenizer_config.json``,
and renders the chat template with jinja2 the way transformers does (a sandboxed
environment with ``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, the same ``tojson``,
``raise_exception`` and ``strftime_now``, the named special tokens as variables), so it gives
the same ids and text token for token (tests/test_codec.py compares them).

:func:`fast_codec` answers None, with the reason, when a directory needs transformers: no
``tokenizer.json``, or a tokenizer class that transformers rebuilds from its vocabulary
rather than loading ``tokenizer.json`` as it is (then the two could differ).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

#: Tokenizer classes transformers loads from tokenizer.json unchanged (no rebuilding).
_PLAIN_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
#: The named special tokens transformers hands a chat template (``special_tokens_map``).
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                   "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@lru_cache(maxsize=16)
def compile_template(source: str) -> Any:
    """The chat template compiled as transformers compiles it (same sandbox and helpers);
    cached by its text (a compiled template renders from any thread)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # Not jinja's own tojson, which escapes HTML characters.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


#: Chat templates shipped with scls, by name (``SCLS_CHAT_TEMPLATE=<name>``).
BUILTIN_TEMPLATES = {"smollm2-tools": "smollm2-tools.jinja"}
#: A function no real request declares: a template that shows it renders tools.
_PROBE_TOOL = {"type": "function", "function": {
    "name": "scls_probe_function_4f1c", "description": "probe",
    "parameters": {"type": "object", "properties": {}}}}


def chat_template_source(value: str) -> str:
    """The text of ``SCLS_CHAT_TEMPLATE``: a built-in template's name or a Jinja file's
    path (as vLLM's ``--chat-template``), checked to compile.

    Raises:
        ValueError: neither a built-in name nor a readable file, or not valid Jinja.
    """
    import jinja2

    if value in BUILTIN_TEMPLATES:
        source = (Path(__file__).parent / "chat_templates" / BUILTIN_TEMPLATES[value]
                  ).read_text(encoding="utf-8")
    elif Path(value).expanduser().is_file():
        source = Path(value).expanduser().read_text(encoding="utf-8")
    else:
        names = ", ".join(BUILTIN_TEMPLATES)
        raise ValueError(f"SCLS_CHAT_TEMPLATE={value!r} is neither a file nor a built-in "
                         f"template ({names}): give the path of a Jinja chat template")
    try:
        compile_template(source)
    except jinja2.TemplateError as exc:
        raise ValueError(f"SCLS_CHAT_TEMPLATE={value!r} is not a valid Jinja template: "
                         f"{exc}") from None
    return source


#: Renders a one-turn chat (messages, tools) to text.
ChatRender = Callable[[list[dict[str, Any]], list[dict[str, Any]]], str]


def template_renders_tools(render: ChatRender) -> bool:
    """Whether a chat template shows the model the tools it is given: ``render`` (messages,
    tools) of a one-turn chat with a probe function names it."""
    try:
        text = render([{"role": "user", "content": "hi"}], [_PROBE_TOOL])
    except Exception:  # a template that raises on tools does not render them
        return False
    return str(_PROBE_TOOL["function"]["name"]) in text  # type: ignore[index]


def _clean_up_spaces(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (for WordPiece-style tokenizers)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                          (" 're", "'re")):
        text = text.replace(before, after)
    return text


@dataclass
class FastCodec:
    """:class:`~shared.modeling.registry.TextCodec` over a ``tokenizers.Tokenizer``."""

    tokenizer: Any  # tokenizers.Tokenizer
    chat_template: str | None
    specials: dict[str, str]  # named special tokens, the chat template's variables
    eos_ids: frozenset[int] = field(default_factory=frozenset)
    pad_id: int = 0
    clean_up_spaces: bool = False

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS or other special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, skipping special tokens."""
        text = str(self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True))
        return _clean_up_spaces(text) if self.clean_up_spaces else text

    @cached_property
    def _template(self) -> Any:
        if self.chat_template is None:
            raise ValueError("this model's tokenizer has no chat template: send a prompt to "
                             "/v1/completions instead")
        return compile_template(self.chat_template)

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The chat as the model reads it (the template's text, special tokens included)."""
        return render_template(self._template, messages, add_generation_prompt, tools,
                               self.specials)

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Apply the chat template (with the generation prompt) and tokenize it."""
        return self.encode(self.render_chat(messages, add_generation_prompt, tools))

    @cached_property
    def renders_tools(self) -> bool:
        """Whether the chat template shows the model its tools
        (:func:`template_renders_tools`)."""
        return (self.chat_template is not None
                and template_renders_tools(lambda chat, tools: self.render_chat(chat, True, tools)))


def render_template(template: Any, messages: list[dict[str, Any]], add_generation_prompt: bool,
                    tools: list[dict[str, Any]] | None, specials: dict[str, str]) -> str:
    """A compiled chat template rendered as transformers renders it."""
    if not messages:
        raise ValueError("cannot apply the chat template to an empty conversation")
    # As transformers does: keys whose value is None are dropped (templates test for a
    # missing key), and the special tokens are variables that messages cannot override.
    chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return str(template.render(messages=chat, tools=tools or None, documents=None,
                               add_generation_prompt=add_generation_prompt, **specials))


def _chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja, chat_template.json or the config's."""
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    source: Any = config.get("chat_template")
    if (model_dir / "chat_template.json").is_file():
        source = json.loads((model_dir / "chat_template.json").read_text())["chat_template"]
    if isinstance(source, list):  # named templates: the default one
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    return source if isinstance(source, str) else None


def _eos_ids(model_dir: Path, tokenizer: Any, specials: dict[str, str]) -> frozenset[int]:
    """EOS ids: the tokenizer's EOS token plus any in generation_config.json."""
    ids: set[int] = set()
    eos = tokenizer.token_to_id(specials["eos_token"]) if "eos_token" in specials else None
    if eos is not None:
        ids.add(int(eos))
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        listed = json.loads(gen_path.read_text()).get("eos_token_id")
        ids.update(int(i) for i in (listed if isinstance(listed, list) else [listed])
                   if i is not None)
    return frozenset(ids)


def why_not_fast(model_dir: Path) -> str | None:
    """Why ``model_dir``'s tokenizer needs transformers; None when :func:`fast_codec` can
    build it."""
    if not (model_dir / "tokenizer.json").is_file():
        return "it has no tokenizer.json"
    if not (model_dir / "tokenizer_config.json").is_file():
        return "it has no tokenizer_config.json (its special tokens are unknown)"
    if (model_dir / "additional_chat_templates").is_dir():
        return "it has several chat templates (additional_chat_templates/)"
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    cls = config.get("tokenizer_class")
    if cls is not None and cls not in _PLAIN_CLASSES:
        return f"transformers rebuilds its tokenizer class {cls} from the vocabulary"
    return None


def fast_codec(model_dir: Path) -> FastCodec:
    """The codec of ``model_dir`` from its tokenizer files (check :func:`why_not_fast`
    first). Padding, as transformers sets it: the pad token, else EOS, else 0."""
    from tokenizers import Tokenizer

    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    specials = {name: text for name in _NAMED_SPECIALS
                if (text := _token_text(config.get(name))) is not None}
    eos_ids = _eos_ids(model_dir, tokenizer, specials)
    pad = tokenizer.token_to_id(specials["pad_token"]) if "pad_token" in specials else None
    if pad is None and "eos_token" in specials:
        pad = tokenizer.token_to_id(specials["eos_token"])
    # transformers skips the clean-up for BPE tokenizers (it would strip real spaces).
    clean = (bool(config.get("clean_up_tokenization_spaces", False))
             and type(tokenizer.model).__name__ != "BPE")
    return FastCodec(tokenizer=tokenizer, chat_template=_chat_template(model_dir, config),
                     specials=specials, eos_ids=eos_ids, pad_id=int(pad or 0),
                     clean_up_spaces=clean)
