"""Real chat-template families (as published with the models), applied to a tokenizer built from SmolLM2's."""

CHATML = None  # SmolLM2's own template (ChatML with a default system prompt)

# Meta-Llama-3-8B-Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral-7B-Instruct-v0.2 style: [INST] turns, system folded into the first user turn, ignores
# add_generation_prompt, assistant content prefixed by a space and closed by </s>.
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant') }}"
    "{%- endif %}{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}{{- ' [INST] ' + system_message + '\n\n' + message['content']"
    " + ' [/INST]' }}{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)

# Gemma-3 style: <start_of_turn>user/model, system folded into the first user turn.
GEMMA = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

SPECIAL_TOKENS = {
    "llama3": {"bos_token": "<|begin_of_text|>", "additional": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>", "additional": []},
    "gemma": {"bos_token": "<bos>", "additional": ["<start_of_turn>", "<end_of_turn>"]},
}


def tokenizer_for(family: str):
    """SmolLM2's tokenizer, re-dressed with another family's template and special tokens."""
    import copy


    tok = copy.deepcopy(_base())
    if family == "chatml":
        return tok
    spec = SPECIAL_TOKENS[family]
    extra = {k: v for k, v in spec.items() if k != "additional"}
    tok.add_special_tokens({**extra, "additional_special_tokens": spec["additional"]})
    tok.chat_template = {"llama3": LLAMA3, "mistral": MISTRAL, "gemma": GEMMA}[family]
    return tok


_BASE = []


def _base():
    from spec_lightning.targets import load_tokenizer

    if not _BASE:
        _BASE.append(load_tokenizer("smollm2-135m-instruct"))
    return _BASE[0]
