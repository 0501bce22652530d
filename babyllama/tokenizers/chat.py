"""Chat templates: how a conversation becomes the token ids a chat model expects.

A template knows two things: the ids that open one turn of a running session (`turn`: the user's
message and whatever marks the assistant's reply as next), and the ids of a whole conversation
(`conversation`, for a stateless request such as the server's). A reply ends at one of the
tokenizer's eos_ids (and, for templates that mark a turn's end in text, at `stop_text`).
LLAMA2 is Llama 2's [INST] format exactly as run.c renders it; CHATML is OpenAI's ChatML;
JinjaTemplate is a model's own `chat_template` (HF tokenizer_config.json, GGUF
tokenizer.chat_template), rendered with jinja2 as transformers' apply_chat_template renders it.
"""

from __future__ import annotations

import json
from datetime import datetime


class ChatTemplate:
    """Base class; `name` identifies the template in messages and the server's model card."""

    name = "none"
    stop_text: str | None = None  # text that ends a reply, for vocabularies without the token

    def turn(self, tokenizer, user: str, system: str | None, first: bool) -> list[int]:
        raise NotImplementedError

    def conversation(self, tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        raise NotImplementedError


class Llama2Template(ChatTemplate):
    """Llama 2's chat format as run.c renders it: each user turn is encoded on its own, with BOS:
    "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]" for the first turn (without the SYS
    block when there is no system prompt), "[INST] {user} [/INST]" after; the reply ends at EOS."""

    name = "llama2"

    @staticmethod
    def text(user: str, system: str | None, first: bool) -> str:
        if first and system:
            return f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]"
        return f"[INST] {user} [/INST]"

    def turn(self, tokenizer, user, system, first):
        return tokenizer.encode(self.text(user, system, first), bos=True)

    def conversation(self, tokenizer, messages, add_generation_prompt=True):
        """What a run.c chat session feeds for these messages: every user turn as `turn` gives it,
        every assistant reply followed by EOS. A system message applies to the first user turn."""
        ids, system, first = [], None, True
        for m in messages:
            role, content = m["role"], m["content"]
            if role == "system":
                system = content
            elif role == "user":
                ids += self.turn(tokenizer, content, system, first)
                first = False
            else:  # assistant
                ids += tokenizer.encode(content, bos=False) + [tokenizer.eos_ids[0]]
        return ids


class ChatMLTemplate(ChatTemplate):
    """ChatML: "<|im_start|>{role}\n{content}<|im_end|>\n" per message, then "<|im_start|>assistant\n".
    With a vocabulary that has no <|im_end|> token (tokenizer.bin) the markers are plain text, and
    a reply ends at EOS or when its text reaches "<|im_end|>"."""

    name = "chatml"
    stop_text = "<|im_end|>"

    @staticmethod
    def text(messages: list[dict], add_generation_prompt: bool = True) -> str:
        out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def turn(self, tokenizer, user, system, first):
        messages = ([{"role": "system", "content": system}] if first and system else []) + \
                   [{"role": "user", "content": user}]
        return tokenizer.encode(self.text(messages), bos=first)

    def conversation(self, tokenizer, messages, add_generation_prompt=True):
        return tokenizer.encode(self.text(messages, add_generation_prompt), bos=True)


class JinjaTemplate(ChatTemplate):
    """A model's own Jinja chat template, rendered as transformers renders it: a sandboxed
    (immutable) environment with trim_blocks and lstrip_blocks, loop controls, `raise_exception`,
    `strftime_now`, a JSON `tojson`, and the variables messages, add_generation_prompt and the
    tokenizer's special tokens (bos_token, eos_token, ...). The rendered text carries its own
    special tokens (e.g. "<|begin_of_text|>"), so it is encoded without adding BOS, as
    apply_chat_template(tokenize=True) does.

    A running session (`turn`) needs the ids of one more user turn after a reply that ended at an
    EOS token: the template renders the conversation with placeholder earlier turns, and the
    turn is what follows the placeholder reply and its end-of-turn token.
    """

    name = "jinja"
    _USER, _REPLY = "\x00babyllama-user\x00", "\x00babyllama-reply\x00"

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, name: str = "jinja"):
        from ..errors import TokenizerError

        try:
            import jinja2
            from jinja2.ext import Extension
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise TokenizerError("this model's chat template needs jinja2: pip install 'babyllama[hf]'") from None

        class Generation(Extension):  # {% generation %}...{% endgeneration %}: transformers' tag, rendered as is
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller):
                return caller()

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise TokenizerError(f"chat_template: not a valid Jinja template ({e})") from None
        self._errors = jinja2.exceptions.TemplateError
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.name = name

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The template's text for these messages (apply_chat_template(tokenize=False))."""
        from ..errors import GenerationError

        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except self._errors as e:
            raise GenerationError(f"the model's chat template refused the conversation: {e}") from None

    def conversation(self, tokenizer, messages, add_generation_prompt=True):
        return tokenizer.encode(self.render(messages, add_generation_prompt), bos=False)

    def turn(self, tokenizer, user, system, first):
        from ..errors import GenerationError

        head = [{"role": "system", "content": system}] if system else []
        if first:
            return tokenizer.encode(self.render(head + [{"role": "user", "content": user}]), bos=False)
        text = self.render(head + [{"role": "user", "content": self._USER}, {"role": "assistant", "content": self._REPLY},
                                   {"role": "user", "content": user}])
        at = text.find(self._REPLY)
        if at < 0:
            raise GenerationError("the model's chat template drops an assistant reply; it cannot continue a session")
        rest = text[at + len(self._REPLY):]
        # the session has already fed the EOS token that ended the reply: the turn starts after it
        # (after the first end-of-turn text that follows the reply, whitespace aside)
        ends = []
        for eos in filter(None, (tokenizer.token_text(i) for i in tokenizer.eos_ids)):
            j = rest.find(eos)
            if j >= 0 and not rest[:j].strip():
                ends.append(j + len(eos))
        return tokenizer.encode(rest[min(ends):] if ends else rest, bos=False)


LLAMA2 = Llama2Template()
CHATML = ChatMLTemplate()
TEMPLATES = {t.name: t for t in (LLAMA2, CHATML)}
