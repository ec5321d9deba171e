"""Built-in synthetic tasks: deterministic generators of chat examples with a held-out split.

Each task is a rule the default model (SmolLM2-135M-Instruct) does not follow out of the box but a small
adapter learns in tens of steps: a fixed output format, copying fields, a word-level transformation. The
metric is exact match of the greedy answer, so "before" is ~0 and learning shows plainly.

Invariant: (task, split, n, seed) -> the same examples, on any machine; no eval prompt appears in train.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

Record = dict[str, object]

_NAMES = (
    "Alice",
    "Bruno",
    "Chen",
    "Dana",
    "Emil",
    "Fatima",
    "Goran",
    "Hana",
    "Ivan",
    "Julia",
    "Kofi",
    "Lena",
    "Mateo",
    "Nora",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
    "Umar",
    "Vera",
    "Wen",
    "Yusuf",
)
_CITIES = (
    "Paris",
    "Lima",
    "Oslo",
    "Cairo",
    "Tokyo",
    "Dublin",
    "Quito",
    "Lagos",
    "Seoul",
    "Prague",
    "Hanoi",
    "Nairobi",
    "Madrid",
    "Berlin",
    "Austin",
    "Perth",
    "Porto",
    "Riga",
    "Delhi",
    "Boston",
)
_WORDS = (
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "lemon",
    "piano",
    "candle",
    "forest",
    "rocket",
    "garden",
    "silver",
    "window",
    "planet",
    "button",
    "marble",
    "violet",
    "anchor",
    "pepper",
    "castle",
    "bridge",
    "meadow",
    "dragon",
    "orange",
    "pillow",
    "jacket",
    "copper",
    "island",
    "rabbit",
    "summer",
)


def _json_extract(rng: random.Random) -> tuple[str, str]:
    name, city, age = rng.choice(_NAMES), rng.choice(_CITIES), rng.randint(18, 89)
    templates = (
        f"{name} is {age} years old and lives in {city}.",
        f"{name} lives in {city} and is {age} years old.",
        f"Living in {city}, {name} is {age}.",
    )
    prompt = "Extract name, age and city as JSON: " + rng.choice(templates)
    return prompt, json.dumps({"name": name, "age": age, "city": city})


def _reverse_words(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, 3)
    return "Reverse the order of these words: " + " ".join(words), " ".join(reversed(words))


def _uppercase_json(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, 3)
    return "Uppercase as JSON: " + " ".join(words), json.dumps({"words": [w.upper() for w in words]})


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str]]


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "json_extract", "copy name, age and city from a sentence into one fixed JSON shape", _json_extract
        ),
        Task("reverse_words", "reverse the order of three words", _reverse_words),
        Task("uppercase_json", 'three words upper-cased into {"words": [...]}', _uppercase_json),
    )
}


def generate(task: str, n_train: int, n_eval: int, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Train and held-out chat records ({"messages": [user, assistant]}); no eval prompt is in train."""
    if task not in TASKS:
        raise ValueError(f"data: unknown task {task!r} (built-in tasks: {', '.join(sorted(TASKS))})")
    make = TASKS[task].make
    # Separate streams per split: the train set does not change when n_eval does, and vice versa.
    train_rng, eval_rng = random.Random(f"{task}/train/{seed}"), random.Random(f"{task}/eval/{seed}")
    train = [make(train_rng) for _ in range(n_train)]
    seen = {p for p, _ in train}
    held: list[tuple[str, str]] = []
    attempts = 0
    while len(held) < n_eval:
        attempts += 1
        if attempts > 100 * (n_eval + 1):
            raise ValueError(f"task {task}: cannot draw {n_eval} held-out prompts unseen in training")
        prompt, answer = make(eval_rng)
        if prompt not in seen:
            seen.add(prompt)
            held.append((prompt, answer))
    return [_chat(p, a) for p, a in train], [_chat(p, a) for p, a in held]


def _chat(prompt: str, answer: str) -> Record:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
