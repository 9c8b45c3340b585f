"""chat_segments / render_chat against the published Jinja templates rendered
by transformers, for the gemma, llama3 and chatml styles."""
import pytest
from transformers.utils import chat_template_utils

from tests.tokenizers.conftest import CHATML_TEMPLATE
from tunejax import errors
from tunejax import tokenizers

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": " What is 2+2?\n"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]

# The published templates (text-only parts), used as the reference.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
  {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set first_user_prefix = "" -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
  {%- if (message['role'] == 'assistant') -%}
    {%- set role = "model" -%}
  {%- else -%}
    {%- set role = message['role'] -%}
  {%- endif -%}
  {{ '<start_of_turn>' + role + '\n' +
     (first_user_prefix if loop.first else "") }}
  {{- message['content'] | trim -}}
  {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{ '<start_of_turn>model\n' }}
{%- endif -%}"""

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def _reference_text(template, tok, messages, add_generation_prompt):
  rendered, _ = chat_template_utils.render_jinja_template(
      conversations=[messages], chat_template=template,
      add_generation_prompt=add_generation_prompt,
      bos_token=tok.decode([tok.bos_id]) if tok.bos_id is not None else "",
      eos_token=tok.decode([tok.eos_id]))
  return rendered[0]


@pytest.fixture(scope="module")
def toks(spm_path, hf_dir):
  return {"spm": tokenizers.load(spm_path), "hf": tokenizers.load(hf_dir)}


@pytest.fixture(scope="module")
def llama_tok(hf_plain_json):
  return tokenizers.load(hf_plain_json)  # bos = <|begin_of_text|>.


CASES = [pytest.param("gemma", "spm", GEMMA3_TEMPLATE, "<end_of_turn>",
                      id="gemma"),
         pytest.param("chatml", "hf", None, "<|im_end|>", id="chatml"),
         pytest.param("llama3", "llama", LLAMA3_TEMPLATE, "<|eot_id|>",
                      id="llama3")]


def _tok(name, toks, llama_tok):
  return llama_tok if name == "llama" else toks[name]


@pytest.mark.parametrize("style,tok_name,template,eot", CASES)
@pytest.mark.parametrize("gen", [False, True])
def test_style_matches_published_template(style, tok_name, template, eot,
                                          gen, toks, llama_tok):
  tok = _tok(tok_name, toks, llama_tok)
  template = template or CHATML_TEMPLATE
  want_text = _reference_text(template, tok, MESSAGES, gen)
  got_text = tokenizers.render_chat_text(tok, MESSAGES, style=style,
                                         add_generation_prompt=gen)
  assert got_text == want_text
  segments = tokenizers.chat_segments(tok, MESSAGES, style=style,
                                      add_generation_prompt=gen)
  flat = [i for ids, _ in segments for i in ids]
  # Concatenated chunks == the whole render tokenized in one go.
  assert flat == tok.encode_with_special(want_text)
  assert flat == tokenizers.render_chat(tok, MESSAGES, style=style,
                                        add_generation_prompt=gen)


@pytest.mark.parametrize("style,tok_name,template,eot", CASES)
def test_segment_roles(style, tok_name, template, eot, toks, llama_tok):
  del template
  tok = _tok(tok_name, toks, llama_tok)
  segments = tokenizers.chat_segments(tok, MESSAGES, style=style)
  roles = [r for _, r in segments]
  want = ["template", "system", "template", "user", "template", "assistant",
          "template", "user", "template", "assistant", "template"]
  # Llama 3 has no separator after <|eot_id|>.
  assert roles == (want[:-1] if style == "llama3" else want)
  eot_id = tok.token_id(eot)
  by_role = [(ids, r) for ids, r in segments if r != "template"]
  for (ids, role), msg in zip(by_role, MESSAGES, strict=True):
    assert role == msg["role"]
    want = msg["content"] if style == "chatml" else msg["content"].strip()
    if role == "assistant":
      assert ids[-1] == eot_id  # The stop token is trained on.
      ids = ids[:-1]
    assert tok.decode(ids) == want
    assert eot_id not in ids  # Content never becomes a control token.
  for ids, role in segments:
    if role == "template":
      assert all(m["content"].strip() not in tok.decode(ids)
                 for m in MESSAGES)


@pytest.mark.parametrize("style,tok_name,template,eot", CASES)
def test_content_cannot_inject_control_tokens(style, tok_name, template, eot,
                                              toks, llama_tok):
  del template
  tok = _tok(tok_name, toks, llama_tok)
  text = f"fake {eot} end <|im_start|> <start_of_turn>"
  messages = [{"role": "user", "content": "hi"},
              {"role": "assistant", "content": text}]
  segments = tokenizers.chat_segments(tok, messages, style=style)
  ids, role = [s for s in segments if s[1] == "assistant"][0]
  assert ids == tok.encode(text) + [tok.token_id(eot)]
  assert not set(ids[:-1]) & set(tok.special_tokens.values())


def test_jinja_template_equals_builtin_chatml(toks):
  tok = toks["hf"]  # Its tokenizer_config.json carries a ChatML template.
  for gen in (False, True):
    via_template = tokenizers.chat_segments(tok, MESSAGES,
                                            add_generation_prompt=gen)
    builtin = tokenizers.chat_segments(tok, MESSAGES, style="chatml",
                                       add_generation_prompt=gen)
    assert via_template == builtin


def test_jinja_trimming_templates_equal_builtins(toks, llama_tok):
  for style, tok, template in (("gemma", toks["spm"], GEMMA3_TEMPLATE),
                               ("llama3", llama_tok, LLAMA3_TEMPLATE)):
    assert tokenizers.chat_segments(tok, MESSAGES, template=template) == (
        tokenizers.chat_segments(tok, MESSAGES, style=style)), style


def test_style_detection_and_stop_ids(toks, llama_tok):
  spm_tok = toks["spm"]
  assert tokenizers.chat_segments(spm_tok, MESSAGES) == (
      tokenizers.chat_segments(spm_tok, MESSAGES, style="gemma"))
  assert tokenizers.chat_stop_ids(spm_tok) == [
      spm_tok.eos_id, spm_tok.token_id("<end_of_turn>")]
  assert tokenizers.chat_stop_ids(llama_tok)[1:] == [
      llama_tok.token_id("<|eot_id|>"), llama_tok.token_id("<|im_end|>")]


def test_errors(toks):
  tok = toks["hf"]
  with pytest.raises(errors.DataError, match="chat message 1"):
    tokenizers.chat_segments(tok, [MESSAGES[0], {"role": "user"}])
  with pytest.raises(errors.ConfigError, match="chat style 'vicuna'"):
    tokenizers.chat_segments(tok, MESSAGES, style="vicuna")
  upper = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
  with pytest.raises(errors.ConfigError, match="message boundaries"):
    tokenizers.chat_segments(tok, MESSAGES, template=upper)
  from tunejax.tokenizers.byte import ByteTokenizer
  with pytest.raises(errors.ConfigError, match="no known chat tokens"):
    tokenizers.chat_segments(ByteTokenizer(), MESSAGES)
  failing = "{{ raise_exception('no system role') }}"
  with pytest.raises(errors.DataError, match="no system role"):
    tokenizers.chat_segments(tok, MESSAGES, template=failing)
