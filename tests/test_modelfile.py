"""Ollama Modelfile export: chat-template families, Go rendering, Modelfile text and round-trip.

The Go-based tests compile tests/go/render_template.go (standard library only) and
skip when no `go` toolchain is installed (Debian: apt-get install golang-go).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import unicodedata

import jinja2
import numpy as np
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kiln.errors import KilnError
from kiln.export.chat_templates import FAMILIES, PROBES, THINK_PROBES, TemplateMatch, match_chat_template
from kiln.export.modelfile import render_modelfile, write_modelfile
from kiln.runtime.chat import render_chat

# ----------------------------------------------------------------------------- templates

# tokenizer.chat_template of SmolLM2-135M-Instruct (GGUF metadata)
SMOLLM2 = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"

# Qwen/Qwen2.5-7B-Instruct (same template for all Qwen2.5 Instruct sizes)
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""

# Qwen/Qwen3-0.6B
QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# Qwen/Qwen3.5-27B, Qwen/Qwen3.5-35B-A3B (chat_template.jinja): thinks by default
QWEN35 = r"""{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count, is_system_content=false) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain images.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Picture ' ~ image_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain videos.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Video ' ~ video_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- else %}
                {{- raise_exception('Unexpected item type in content.') }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is none or content is undefined %}
        {{- '' }}
    {%- else %}
        {{- raise_exception('Unexpected content type.') }}
    {%- endif %}
{%- endmacro %}
{%- if not messages %}
    {{- raise_exception('No messages provided.') }}
{%- endif %}
{%- if tools and tools is iterable and tools is not mapping %}
    {{- '<|im_start|>system\n' }}
    {{- "# Tools\n\nYou have access to the following functions:\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>" }}
    {{- '\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after\n- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT>' }}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {%- if content %}
            {{- '\n\n' + content }}
        {%- endif %}
    {%- endif %}
    {{- '<|im_end|>\n' }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {{- '<|im_start|>system\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set content = render_content(message.content, false)|trim %}
        {%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if ns.multi_step_tool %}
    {{- raise_exception('No user query found in messages.') }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, true)|trim %}
    {%- if message.role == "system" %}
        {%- if not loop.first %}
            {{- raise_exception('System message must be at the beginning.') }}
        {%- endif %}
    {%- elif message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- set reasoning_content = reasoning_content|trim %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content + '\n</think>\n\n' + content }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls and message.tool_calls is iterable and message.tool_calls is not mapping %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {%- if loop.first %}
                    {%- if content|trim %}
                        {{- '\n\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                    {%- else %}
                        {{- '<tool_call>\n<function=' + tool_call.name + '>\n' }}
                    {%- endif %}
                {%- else %}
                    {{- '\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                {%- endif %}
                {%- if tool_call.arguments is defined %}
                    {%- for args_name, args_value in tool_call.arguments|items %}
                        {{- '<parameter=' + args_name + '>\n' }}
                        {%- set args_value = args_value | tojson | safe if args_value is mapping or (args_value is sequence and args_value is not string) else args_value | string %}
                        {{- args_value }}
                        {{- '\n</parameter>\n' }}
                    {%- endfor %}
                {%- endif %}
                {{- '</function>\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.previtem and loop.previtem.role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if not loop.last and loop.nextitem.role != "tool" %}
            {{- '<|im_end|>\n' }}
        {%- elif loop.last %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unexpected message role.') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- else %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}"""
# Qwen/Qwen3.5-0.8B, 2B, 4B: the same template but for its last lines, which answer without thinking by default
QWEN35_SMALL = QWEN35.replace(
    "{%- if enable_thinking is defined and enable_thinking is false %}\n        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- else %}\n        {{- '<think>\\n' }}\n",
    "{%- if enable_thinking is defined and enable_thinking is true %}\n        {{- '<think>\\n' }}\n"
    "    {%- else %}\n        {{- '<think>\\n\\n</think>\\n\\n' }}\n")

# meta-llama/Llama-3.1-8B-Instruct
LLAMA31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""

# Plain ChatML (Qwen-style, no default system prompt)
PLAIN_CHATML = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
# Qwen1.5 / Qwen2 Instruct
QWEN2 = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
# HuggingFaceH4/zephyr-7b-beta
ZEPHYR = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
# mistralai/Mistral-7B-Instruct-v0.1
MISTRAL = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
# google/gemma-2b-it: no family for it (Gemma maps assistant -> model and trims)
GEMMA = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
L31_PREAMBLE = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"

# name -> (jinja, bos_token, eos_token, family, params, bos_prefix)
CASES = {
    "smollm2": (SMOLLM2, "<|im_start|>", "<|im_end|>", "chatml", {"default_system": SMOLLM_SYSTEM}, ""),
    "qwen2.5": (QWEN25, None, "<|im_end|>", "chatml", {"default_system": QWEN_SYSTEM}, ""),
    "qwen2": (QWEN2, None, "<|im_end|>", "chatml", {"default_system": "You are a helpful assistant."}, ""),
    "chatml": (PLAIN_CHATML, None, "<|im_end|>", "chatml", {"default_system": None}, ""),
    "qwen3": (QWEN3, None, "<|im_end|>", "chatml", {"default_system": None}, ""),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "llama3", {"preamble": None}, "<|begin_of_text|>"),
    "llama3.1": (LLAMA31, "<|begin_of_text|>", "<|eot_id|>", "llama3", {"preamble": L31_PREAMBLE}, "<|begin_of_text|>"),
    "zephyr": (ZEPHYR, "<s>", "</s>", "zephyr", {"eos": "</s>", "sep": ""}, ""),
    "mistral": (MISTRAL, "<s>", "</s>", "mistral-instruct", {"eos": "</s>", "sep": ""}, "<s>"),
    "qwen3.5": (QWEN35, None, "<|im_end|>", "qwen3.5", {"thinking": True}, ""),
    "qwen3.5-small": (QWEN35_SMALL, None, "<|im_end|>", "qwen3.5", {"thinking": False}, ""),
}

# Conversations for the Go-vs-HF comparison: the matcher's probes plus a few more.
CONVERSATIONS = [list(p) for p in PROBES] + [
    [{"role": "user", "content": "Write {{ .Prompt }} and {% if %} literally, then a `code` block:\n```\nx = {'a': 1}\n```"}],
    [{"role": "system", "content": "Système: réponds en français 🇫🇷"}, {"role": "user", "content": "Bonjour\ttab"}],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "line1\nline2"},
     {"role": "user", "content": "q2"}, {"role": "assistant", "content": "r2"}, {"role": "user", "content": "q3"}],
]


def hf_render(jinja_source: str, messages, bos_token, eos_token, enable_thinking: bool | None = None) -> str:
    """Render as transformers' apply_chat_template(tokenize=False, add_generation_prompt=True) does.

    Messages are in Ollama's form: a message's `thinking` goes to the template as `reasoning_content`."""

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    messages = [{("reasoning_content" if k == "thinking" else k): v for k, v in m.items()} for m in messages]
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return env.from_string(jinja_source).render(
        messages=messages, add_generation_prompt=True, bos_token=bos_token or "", eos_token=eos_token or "", **extra)


# ----------------------------------------------------------------------------- Go renderer


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """Build tests/go/render_template.go once; return a function rendering (template, messages)."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go toolchain not installed (apt-get install golang-go); Go template rendering not checked")
    work = tmp_path_factory.mktemp("go")
    env = dict(os.environ, GOPATH=str(work / "gopath"), GOFLAGS="-mod=mod", GOTOOLCHAIN="local",
               GOPROXY="off", GOTELEMETRY="off", GO111MODULE="auto", CGO_ENABLED="0")
    if "GOCACHE" not in os.environ:
        user_cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "go-build"
        try:
            user_cache.mkdir(parents=True, exist_ok=True)
            env["GOCACHE"] = str(user_cache) if os.access(user_cache, os.W_OK) else str(work / "gocache")
        except OSError:
            env["GOCACHE"] = str(work / "gocache")
    src = pathlib.Path(__file__).parent / "go" / "render_template.go"
    exe = work / "render_template"
    proc = subprocess.run([go, "build", "-o", str(exe), str(src)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"go build failed:\n{proc.stderr}"

    def render(template: str, messages, think: bool | None = None) -> str:
        """`think`: the request's think setting (None: not set, as when a client leaves it out)."""
        request = {"template": template, "messages": messages, **({} if think is None else {"think": think})}
        p = subprocess.run([str(exe)], input=json.dumps(request).encode(), capture_output=True, timeout=60)
        assert p.returncode == 0, p.stderr.decode()
        return p.stdout.decode("utf-8")

    return render


# ----------------------------------------------------------------------------- matching


@pytest.mark.parametrize("name", sorted(CASES))
def test_match_finds_family(name):
    jinja_src, bos, eos, family, params, bos_prefix = CASES[name]
    m = match_chat_template(jinja_src, bos, eos)
    assert m is not None, name
    assert (m.family, dict(m.params), m.bos_prefix) == (family, params, bos_prefix)


def test_match_rejects_unknown_and_broken():
    assert match_chat_template(GEMMA, "<bos>", "<eos>") is None
    assert match_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}", None, None) is None
    assert match_chat_template("{% if %}", None, None) is None  # does not compile
    assert match_chat_template("{{ raise_exception('no') }}", None, None) is None


def test_llama3_notes_trim_and_frozen_date():
    m = match_chat_template(LLAMA3, "<|begin_of_text|>", "<|eot_id|>")
    assert any("trim" in n for n in m.notes)
    dated = LLAMA31.replace('{%- set date_string = "26 Jul 2024" %}', '{%- set date_string = strftime_now("%d %b %Y") %}')
    m = match_chat_template(dated, "<|begin_of_text|>", "<|eot_id|>")
    assert m.family == "llama3" and any("freezes" in n for n in m.notes)


# ----------------------------------------------------------------------------- (a) Go == HF, (b) twin == Go


@pytest.mark.parametrize("name", sorted(CASES))
def test_go_template_renders_like_hf(name, go_render):
    jinja_src, bos, eos, *_ = CASES[name]
    m = match_chat_template(jinja_src, bos, eos)
    go_tmpl = m.go_template(include_bos=True)
    compared = 0
    for conv in CONVERSATIONS:
        try:
            expected = hf_render(jinja_src, conv, bos, eos)
        except jinja2.exceptions.TemplateError:
            continue  # e.g. Mistral rejects system messages
        got = go_render(go_tmpl, conv)
        assert got == expected, f"{name}: {conv}"
        assert m.render(conv) == got
        compared += 1
    assert compared >= 6


_EXTRA_TWIN_CONVS = [
    [],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],  # Ollama merges these
    [{"role": "system", "content": "s1"}, {"role": "user", "content": "u"}, {"role": "system", "content": "s2"},
     {"role": "user", "content": "v"}],
    [{"role": "assistant", "content": "prefill first"}, {"role": "user", "content": "u"}],
    [{"role": "user", "content": "  padded \n"}],
]


def _all_matches():
    out = []
    for name in sorted(CASES):
        jinja_src, bos, eos, *_ = CASES[name]
        out.append((name, match_chat_template(jinja_src, bos, eos)))
    # parameters that need escaping inside the Go template
    out.append(("chatml-weird-default", TemplateMatch(
        "chatml", {"default_system": 'Use {{ .System }} and """quotes""" \\ zero\u200bwidth\ttab'})))
    out.append(("llama3-weird-preamble", TemplateMatch("llama3", {"preamble": "{{ x }}\n"}, "<|begin_of_text|>")))
    return out


@pytest.mark.parametrize("name,match", _all_matches(), ids=lambda v: v if isinstance(v, str) else "")
def test_python_twin_equals_go(name, match, go_render):
    for include_bos in (True, False):
        tmpl = match.go_template(include_bos)
        assert '"""' not in tmpl
        for conv in CONVERSATIONS + _EXTRA_TWIN_CONVS:
            assert match.render(conv, include_bos) == go_render(tmpl, conv), (name, include_bos, conv)


def test_go_renderer_legacy_prompt_template(go_render):
    """Templates without .Messages run once per turn, the last one cut after {{ .Response }} (Ollama)."""
    tmpl = "{{ if .System }}S:{{ .System }} {{ end }}U:{{ .Prompt }} A:{{ .Response }}|"
    conv = [{"role": "system", "content": "sys"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
    assert go_render(tmpl, conv) == "S:sys U:u1 A:a1|U:u2 A:"
    assert go_render("{{ .Prompt }}", conv[1:2]) == "u1"


# ----------------------------------------------------------------------------- (c) render_modelfile on a GGUF

TOKENS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "hello", "world", "!"]


def write_gguf(path: pathlib.Path, *, chat_template: str | None = QWEN25, context_length: int | None = 32768,
               license: str | None = "apache-2.0", add_bos: bool | None = None, tokens=TOKENS,
               bos_id: int | None = None, eos_id: int | None = 3, eot_id: int | None = None) -> pathlib.Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("Tiny Test Model")
    if context_length is not None:
        w.add_context_length(context_length)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    if bos_id is not None:
        w.add_bos_token_id(bos_id)
    if eos_id is not None:
        w.add_eos_token_id(eos_id)
    if eot_id is not None:
        w.add_eot_token_id(eot_id)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    if license is not None:
        w.add_license(license)
    w.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_render_modelfile_qwen(tmp_path):
    g = write_gguf(tmp_path / "tiny.Q8_0.gguf", eot_id=1)
    res = render_modelfile(g)
    assert res.warnings == []
    text = res.text
    assert "FROM ./tiny.Q8_0.gguf\n" in text
    m = match_chat_template(QWEN25, None, "<|im_end|>")
    assert f'TEMPLATE """{m.go_template()}"""\n' in text
    assert QWEN_SYSTEM in text
    stops = [line for line in text.splitlines() if line.startswith("PARAMETER stop")]
    assert stops == ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"', 'PARAMETER stop "<|endoftext|>"']
    assert "PARAMETER num_ctx 32768\n" in text
    assert 'LICENSE """apache-2.0"""' in text
    parsed = parse_modelfile(text)
    assert parsed["template"] == [m.go_template()]


def test_stops_only_from_vocab_and_bos_left_to_runtime(tmp_path):
    toks = ["<unk>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"]
    g = write_gguf(tmp_path / "l3.gguf", chat_template=LLAMA3, tokens=toks, bos_id=1, eos_id=5, eot_id=2,
                   add_bos=True)
    text = render_modelfile(g).text
    tmpl = parse_modelfile(text)["template"][0]
    assert "<|begin_of_text|>" not in tmpl  # add_bos_token: llama.cpp adds it; no double bos
    assert parse_modelfile(text)["stop"] == ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"]
    assert "# note:" in text and "trim" in text
    g2 = write_gguf(tmp_path / "l3b.gguf", chat_template=LLAMA3, tokens=toks, bos_id=1, eos_id=5, add_bos=False)
    assert parse_modelfile(render_modelfile(g2).text)["template"][0].startswith("<|begin_of_text|>")
    # zephyr's <|user|> etc. are no tokens of this vocabulary: only </s> stays
    g3 = write_gguf(tmp_path / "z.gguf", chat_template=ZEPHYR, tokens=["<unk>", "<s>", "</s>"], bos_id=1, eos_id=2)
    assert parse_modelfile(render_modelfile(g3).text)["stop"] == ["</s>"]


def test_unknown_template_gives_warning_and_no_template(tmp_path):
    g = write_gguf(tmp_path / "g.gguf", chat_template=GEMMA)
    res = render_modelfile(g)
    assert "TEMPLATE" not in res.text.replace("# No TEMPLATE", "")
    assert "# No TEMPLATE: chat template matches no known family" in res.text
    assert len(res.warnings) == 1 and "no TEMPLATE" in res.warnings[0]
    assert parse_modelfile(res.text)["stop"] == ["<|im_end|>"]  # eos still stops
    res2 = render_modelfile(write_gguf(tmp_path / "n.gguf", chat_template=None))
    assert "has no tokenizer.chat_template" in res2.warnings[0]


def test_corrupt_and_incomplete_gguf(tmp_path):
    g = write_gguf(tmp_path / "c.gguf")
    data = g.read_bytes()
    g.write_bytes(data[: len(data) // 3])
    with pytest.raises(KilnError, match=r"c\.gguf: not a valid GGUF file") as ei:
        render_modelfile(g)
    assert "\n" not in str(ei.value)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(KilnError, match="junk.gguf"):
        render_modelfile(tmp_path / "junk.gguf")
    with pytest.raises(KilnError, match=r"missing GGUF key llama\.context_length"):
        render_modelfile(write_gguf(tmp_path / "noctx.gguf", context_length=None))
    with pytest.raises(KilnError, match="eos_token_id"):
        render_modelfile(write_gguf(tmp_path / "badeos.gguf", eos_id=99))
    with pytest.raises(KilnError, match="not found"):
        render_modelfile(tmp_path / "missing.gguf")


def test_license_file_and_triple_quote_refused(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    g = write_gguf(d / "x.gguf")
    (d / "LICENSE").write_text("Apache License\r\nVersion 2.0\f\n\n  TERMS\n", encoding="utf-8")
    text = render_modelfile(g).text
    assert parse_modelfile(text)["license"] == ["Apache License\nVersion 2.0\n\n  TERMS"]
    (d / "LICENSE").write_text('say """hi"""')
    with pytest.raises(KilnError, match="triple double quote"):
        render_modelfile(g)


def test_write_modelfile_atomic_and_relative(tmp_path):
    (tmp_path / "out").mkdir()
    g = write_gguf(tmp_path / "out" / "model.gguf")
    dest = write_modelfile(g)
    assert dest == tmp_path / "out" / "Modelfile"
    assert parse_modelfile(dest.read_text(encoding="utf-8"))["from"] == ["./model.gguf"]
    assert [p.name for p in dest.parent.iterdir() if p.name.endswith(".part")] == []
    other = write_modelfile(g, tmp_path / "elsewhere" / "Modelfile.qwen")
    assert parse_modelfile(other.read_text(encoding="utf-8"))["from"] == ["../out/model.gguf"]
    g.write_bytes(b"GGUF broken")
    with pytest.raises(KilnError):
        write_modelfile(g)
    assert dest.read_text(encoding="utf-8").startswith("# Ollama Modelfile")  # old file untouched


# ----------------------------------------------------------------------------- (d) Modelfile parser


def _go_is_print(ch: str) -> bool:
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def parse_modelfile(text: str) -> dict[str, list[str]]:
    """Parse per Ollama's documented Modelfile format (docs/modelfile.mdx, parser/parser.go behaviour):
    `# comment` lines, case-insensitive INSTRUCTION then value; values may be "quoted" or
    \"\"\"triple-quoted\"\"\" and then span lines; inside values only printable runes, spaces,
    tabs and newlines are kept. Returns {instruction or parameter name: [values...]}."""
    out: dict[str, list[str]] = {}
    state, buf, name = "nil", "", ""
    valid = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
             "message", "requires"}

    def emit(value: str) -> None:
        out.setdefault(name, []).append(value)

    for ch in text:
        if state == "nil":
            if ch == "#":
                state = "comment"
            elif ch in " \t\r\n":
                pass
            else:
                state, buf = "name", ch
        elif state == "comment":
            if ch in "\r\n":
                state = "nil"
        elif state == "name":
            if ch.isascii() and ch.isalpha():
                buf += ch
            elif ch in " \t":
                word = buf.lower()
                assert word in valid, f"invalid instruction {buf!r}"
                name = "from" if word == "from" else word
                state, buf = ("param" if word == "parameter" else "value"), ""
            else:
                raise AssertionError(f"bad character {ch!r} in instruction")
        elif state == "param":
            if ch.isascii() and (ch.isalnum() or ch == "_"):
                buf += ch
            elif ch in " \t":
                name, state, buf = buf, "value", ""
            else:
                raise AssertionError("bad parameter name")
        elif state == "value":
            if ch in " \t\r\n":
                value, ok = _unquote(buf.strip())
                if not ok or ch in " \t":
                    buf += ch
                    continue
                emit(value)
                state, buf = "nil", ""
            elif _go_is_print(ch):
                buf += ch
    if state == "value":
        value, ok = _unquote(buf.strip())
        assert ok, "unterminated quoted value"
        emit(value)
    else:
        assert state in ("nil", "comment"), "truncated Modelfile"
    assert "from" in out, "no FROM line"
    return out


def test_parser_semantics():
    p = parse_modelfile('from ./a.gguf\n# c\nTemplate """x\n  y """\nparameter stop "<|e|>"\nPARAMETER stop </s>\n')
    assert p == {"from": ["./a.gguf"], "template": ["x\n  y "], "stop": ["<|e|>", "</s>"]}


@pytest.mark.parametrize("name", sorted(CASES))
def test_modelfile_template_round_trips(tmp_path, name, go_render):
    """TEMPLATE survives Modelfile parsing byte for byte, and still renders like HF after it."""
    jinja_src, bos, eos, *_ = CASES[name]
    toks = ["<unk>", bos or "<s>", eos, "<|im_start|>"]
    g = write_gguf(tmp_path / f"{name}.gguf", chat_template=jinja_src, tokens=list(dict.fromkeys(toks)),
                   bos_id=1, eos_id=2 if (bos or "<s>") != eos else 1, add_bos=False)
    dest = write_modelfile(g)
    parsed = parse_modelfile(dest.read_text(encoding="utf-8"))
    m = match_chat_template(jinja_src, bos, eos)
    assert parsed["template"] == [m.go_template(include_bos=True)]
    assert parsed["num_ctx"] == ["32768"]
    conv = CONVERSATIONS[3] if name != "mistral" else CONVERSATIONS[2]
    assert go_render(parsed["template"][0], conv) == hf_render(jinja_src, conv, bos, eos)


def test_weird_default_system_round_trips(tmp_path, go_render):
    weird = 'Be {{ nice }}, say """hi""" \\o/ zero\u200bwidth\u00a0nbsp'
    jinja_src = QWEN2.replace("You are a helpful assistant.", weird.replace("\\", "\\\\"))
    g = write_gguf(tmp_path / "w.gguf", chat_template=jinja_src)
    parsed = parse_modelfile(render_modelfile(g).text)
    conv = [{"role": "user", "content": "hi"}]
    assert go_render(parsed["template"][0], conv) == hf_render(jinja_src, conv, None, "<|im_end|>")
    assert weird in go_render(parsed["template"][0], conv)


def test_families_table_is_consistent():
    names = [f.name for f in FAMILIES]
    assert len(names) == len(set(names)) and {"chatml", "llama3"} <= set(names)


# ----------------------------------------------------------------------------- Qwen3.5: the thinking block

# Ollama-form conversations (`thinking` = HF's reasoning_content): reasoning shows on assistant turns after
# the last user turn and is dropped before it.
THINK_CONVERSATIONS = [list(msgs) for msgs, _ in THINK_PROBES] + [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Plan a trip"},
     {"role": "assistant", "content": "Step 1:\n- pack", "thinking": "List the steps.\n\nThen pack."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "thinking": "before the last user turn"},
     {"role": "user", "content": "c"}],
]


@pytest.mark.parametrize("think", [None, True, False])
@pytest.mark.parametrize("name", ["qwen3.5", "qwen3.5-small"])
def test_qwen35_thinking_renders_like_hf(name, think, go_render):
    """Reasoning (Ollama's `thinking`) and the think setting (Ollama's think, HF's enable_thinking; None: unset)
    render in Go exactly as the HF template renders them, and the Python twin agrees."""
    jinja_src, bos, eos, *_ = CASES[name]
    m = match_chat_template(jinja_src, bos, eos)
    tmpl = m.go_template()
    for conv in THINK_CONVERSATIONS:
        expected = hf_render(jinja_src, conv, bos, eos, enable_thinking=think)
        assert go_render(tmpl, conv, think) == expected, conv
        assert m.render(conv, think=think) == expected, conv
    shown = hf_render(jinja_src, THINK_CONVERSATIONS[0], bos, eos, enable_thinking=think)
    assert "<|im_start|>assistant\n<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>\n" in shown
    assert "before the last user turn" not in hf_render(jinja_src, THINK_CONVERSATIONS[-1], bos, eos)


def test_qwen35_generation_prompt_stops_and_notes():
    conv = [{"role": "user", "content": "Hi"}]
    big, small = (match_chat_template(t, None, "<|im_end|>") for t in (QWEN35, QWEN35_SMALL))
    assert big.render(conv) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert small.render(conv) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert small.stops == ("<|im_end|>", "<|im_start|>") and small.default_system is None
    assert any("trims" in n and "thinking" in n for n in small.notes)


def test_think_probes_reject_a_lookalike():
    """A template equal to Qwen3.5 on the plain probes but showing no reasoning is not taken for it."""
    shown = "'\\n<think>\\n' + reasoning_content + '\\n</think>\\n\\n' + content"
    assert shown in QWEN35
    assert match_chat_template(QWEN35.replace(shown, "'\\n' + content"), None, "<|im_end|>") is None


def test_generate_chat_renders_qwen35_as_transformers():
    """`kiln generate --chat` renders the artifact's own template (kiln.runtime.chat): Qwen3.5's macros run in
    the sandbox, its thinking default holds, and enable_thinking, when given, switches it as in transformers."""
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    head = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(QWEN35_SMALL, conv) == head + "<think>\n\n</think>\n\n"
    assert render_chat(QWEN35_SMALL, conv, enable_thinking=True) == head + "<think>\n"
    assert render_chat(QWEN35, conv) == head + "<think>\n"
    for tmpl in (QWEN35, QWEN35_SMALL):
        for think in (None, True, False):
            assert render_chat(tmpl, conv, enable_thinking=think) == hf_render(tmpl, conv, None, None, think)


def test_tiny_qwen3_5_gguf_gets_the_qwen35_template(tmp_path, go_render):
    """The tiny Qwen3.5 fixture (which ships plain ChatML) given Qwen3.5-0.8B's template and exported to GGUF:
    its Modelfile carries the qwen3.5 TEMPLATE, which renders in Go like the GGUF's Jinja template, and the
    prompt `kiln generate --chat` builds is that template's rendering (no thinking, the 0.8B default)."""
    for mod in ("llama_cpp", "torch", "transformers"):
        pytest.importorskip(mod)
    from kiln.fixtures import build
    from kiln.formats import open_engine
    from kiln.pipeline import export_gguf_artifact
    from kiln.runtime.generate import prompt_ids

    src = shutil.copytree(build("tiny-qwen3_5", progress=False), tmp_path / "src",
                          ignore=shutil.ignore_patterns(".kiln-*"))
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN35_SMALL}), encoding="utf-8")
    gguf_path = tmp_path / "q35.f32.gguf"
    export_gguf_artifact(src, gguf_path, "f32", verify=False, modelfile=True)

    parsed = parse_modelfile((tmp_path / "q35.f32.Modelfile").read_text(encoding="utf-8"))
    assert parsed["template"] == [match_chat_template(QWEN35_SMALL, None, "<|im_end|>").go_template()]
    assert parsed["stop"][:2] == ["<|im_end|>", "<|im_start|>"]
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = hf_render(QWEN35_SMALL, conv, None, "<|im_end|>")
    assert expected.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert go_render(parsed["template"][0], conv) == expected
    with open_engine(gguf_path) as engine:
        assert engine.chat_template == QWEN35_SMALL
        assert prompt_ids(engine, "Hi", chat=True, system="Be brief.") == engine.tokenize(expected)
        thinking = hf_render(QWEN35_SMALL, conv, None, "<|im_end|>", True)
        assert thinking.endswith("<|im_start|>assistant\n<think>\n")
        assert prompt_ids(engine, "Hi", chat=True, system="Be brief.", thinking=True) == engine.tokenize(thinking)
    # the CLI: --think switches it on; without --chat it has nothing to act on
    from kiln_cli import kiln, one_line_error

    proc = kiln("generate", gguf_path, "--chat", "--think", "--prompt", "Hi", "--max-tokens", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    one_line_error(kiln("generate", gguf_path, "--think", "--prompt", "Hi", "--max-tokens", "2"), "--chat")


def test_num_ctx_set_capped_and_checked(tmp_path):
    g = write_gguf(tmp_path / "tiny.Q8_0.gguf", eot_id=1)
    assert "PARAMETER num_ctx 8192\n" in render_modelfile(g, num_ctx=8192).text
    res = render_modelfile(g, num_ctx=65536)
    assert "PARAMETER num_ctx 32768\n" in res.text and any("capped" in w for w in res.warnings)
    with pytest.raises(KilnError, match="num_ctx 0"):
        render_modelfile(g, num_ctx=0)
    out = write_modelfile(g, tmp_path / "Modelfile", num_ctx=4096)
    assert "PARAMETER num_ctx 4096\n" in out.read_text()


def test_kiln_modelfile_sizes_num_ctx_for_the_machine(smollm2_dir, tmp_path):
    """`kiln modelfile` picks num_ctx from the cost model (a multiple of 256, at most the context) unless
    --num-ctx is given; a budget too small for the full 8192 gives less."""
    pytest.importorskip("llama_cpp")
    from kiln.bench.plan import machine_num_ctx
    from kiln.fixtures import smollm2_original_gguf
    from kiln_cli import kiln

    gguf_path = smollm2_original_gguf()
    small = machine_num_ctx(gguf_path, memory=400 * 2 ** 20)
    assert 256 <= small < 8192 and small % 256 == 0
    assert machine_num_ctx(gguf_path, memory=64 * 2 ** 30) == 8192
    r = kiln("modelfile", gguf_path, "-o", tmp_path / "a.Modelfile")
    assert r.returncode == 0, r.stderr
    n = int(parse_modelfile((tmp_path / "a.Modelfile").read_text())["num_ctx"][0])
    assert 256 <= n <= 8192 and (n % 256 == 0 or n == 8192)
    r = kiln("modelfile", gguf_path, "-o", tmp_path / "b.Modelfile", "--num-ctx", "2048")
    assert r.returncode == 0, r.stderr
    assert parse_modelfile((tmp_path / "b.Modelfile").read_text())["num_ctx"] == ["2048"]
