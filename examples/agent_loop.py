"""An agent loop against `glmtune serve` with the official openai client: the model calls a tool, we run it,
send the result back, and the model answers with it.

    glmtune serve --adapter_name_or_path output/tools &      # a model tuned on examples/data/tool_calls.jsonl
    python examples/agent_loop.py "What is the weather in Paris?"            # tool_choice auto
    python examples/agent_loop.py "What is the weather in Paris?" required   # the first answer must be a call
"""

from __future__ import annotations

import json
import sys

import openai

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers",
     "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"]}}},
]


def run_tool(name: str, arguments: dict) -> dict:
    if name == "get_weather":
        return {"city": arguments["city"], "sky": "sunny", "celsius": 23}
    if name == "add":
        return {"result": arguments["a"] + arguments["b"]}
    return {"error": f"no tool {name}"}


def agent(question: str, base_url: str = "http://127.0.0.1:8000/v1", max_rounds: int = 4,
          first_choice: str = "auto") -> str:
    """``first_choice="required"`` forces the first answer to be a call (for a model not tuned on tool calls)."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=600)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": question}]
    for round_index in range(max_rounds):
        choice = first_choice if round_index == 0 else "auto"
        reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice=choice,
                                               max_tokens=64)
        message = reply.choices[0].message
        print(f"[{reply.choices[0].finish_reason}] content={message.content!r} tool_calls="
              f"{[(c.function.name, c.function.arguments) for c in message.tool_calls or []]}")
        if not message.tool_calls:
            return message.content
        messages.append({"role": "assistant", "content": message.content, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in message.tool_calls]})
        for call in message.tool_calls:
            result = run_tool(call.function.name, json.loads(call.function.arguments))
            print(f"  ran {call.function.name} -> {result}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    return "(no final answer)"


if __name__ == "__main__":
    question = sys.argv[1] if len(sys.argv) > 1 else "What is the weather in Paris?"
    print("final answer:", agent(question, first_choice=sys.argv[2] if len(sys.argv) > 2 else "auto"))
