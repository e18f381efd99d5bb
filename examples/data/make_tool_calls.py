"""Write a small glaive-style tool-calling set (LLaMA-Factory's sharegpt layout) for `glmtune train`.

Each record: `conversations` with human -> function_call (the call as JSON) -> observation (the tool's
result) -> gpt (the answer that uses it), plus some plain questions answered without a call, and `tools`,
the function definitions as a JSON string. Everything is generated here from small tables.

    python examples/data/make_tool_calls.py examples/data/tool_calls.jsonl
    glmtune train --dataset_format sharegpt --train_file examples/data/tool_calls.jsonl ...
"""

from __future__ import annotations

import json
import random
import sys

WEATHER = {"name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "city name"}},
                          "required": ["city"]}}
ADD = {"name": "add", "description": "Add two integers",
       "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                      "required": ["a", "b"]}}
TOOLS = json.dumps([WEATHER, ADD], ensure_ascii=False)

CITIES = ["Paris", "Berlin", "Tokyo", "Beijing", "Cairo", "Lima", "Oslo", "Rome", "Madrid", "Seoul", "Delhi", "Sydney"]
SKIES = ["sunny", "cloudy", "rainy", "windy", "snowy"]
WEATHER_ASKS = ["What is the weather in {city}?", "How is the weather in {city} now?", "Is it warm in {city} today?",
                "Tell me the weather in {city}."]
ADD_ASKS = ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "How much is {a} and {b} together?"]
PLAIN = [("Hello!", "Hello! I can look up the weather or add numbers for you."),
         ("Who are you?", "I am an assistant that can call tools to check the weather and add numbers."),
         ("Thank you.", "You are welcome!")]


def turn(role: str, value) -> dict:
    return {"from": role, "value": value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}


def weather_record(rng: random.Random) -> dict:
    city, sky, degrees = rng.choice(CITIES), rng.choice(SKIES), rng.randint(-5, 35)
    return {"conversations": [
        turn("human", rng.choice(WEATHER_ASKS).format(city=city)),
        turn("function_call", {"name": "get_weather", "arguments": {"city": city}}),
        turn("observation", {"city": city, "sky": sky, "celsius": degrees}),
        turn("gpt", f"It is {sky} in {city}, {degrees} degrees Celsius."),
    ], "tools": TOOLS}


def add_record(rng: random.Random) -> dict:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return {"conversations": [
        turn("human", rng.choice(ADD_ASKS).format(a=a, b=b)),
        turn("function_call", {"name": "add", "arguments": {"a": a, "b": b}}),
        turn("observation", {"result": a + b}),
        turn("gpt", f"{a} plus {b} is {a + b}."),
    ], "tools": TOOLS}


def plain_record(rng: random.Random) -> dict:
    question, answer = rng.choice(PLAIN)
    return {"conversations": [turn("human", question), turn("gpt", answer)], "tools": TOOLS}


def main(path: str, count: int = 240, seed: int = 0) -> None:
    rng = random.Random(seed)
    makers = [weather_record] * 5 + [add_record] * 4 + [plain_record]
    with open(path, "w", encoding="utf-8") as out:
        for _ in range(count):
            out.write(json.dumps(rng.choice(makers)(rng), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tool_calls.jsonl")
