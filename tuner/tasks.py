"""Built-in tasks: deterministic chat examples with a held-out split of at least 64 prompts.

The synthetic ones are rules the default model (SmolLM2-135M-Instruct) does not follow out of the box but a
small adapter learns in tens of steps: a fixed output format, copying fields, a word-level transformation.
`iso_alpha3` is real public data: the ISO 3166-1 country list shipped in the `pycountry` package (from
Debian's iso-codes), country name -> alpha-3 code; its 64 held-out countries are never trained on, so a gain
there is knowledge and format carried over to unseen countries, not memorised answers. The metric is exact
match of the greedy answer, scored the same way (train.evaluate) for the base and the tuned model.

Invariant: (task, split, n, seed) -> the same examples, on any machine; no eval prompt appears in train.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

from .events import Cancelled

Record = dict[str, object]
_POLL = 1024  # examples between two should_stop() polls (~30 ms on a busy core)

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


EVAL_POOL = 64  # held-out prompts every task can give (finite tasks keep exactly these out of training)


def _iso_alpha3() -> list[tuple[str, str]]:
    try:
        import pycountry
    except ImportError as exc:
        raise ValueError(
            "data: task:iso_alpha3 needs the pycountry package (pip install 'effllm[model]')"
        ) from exc
    return [
        (f"What is the ISO 3166-1 alpha-3 code of {c.name}? Answer with the code only.", c.alpha_3)
        for c in sorted(pycountry.countries, key=lambda c: c.alpha_3)
    ]


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str]] | None = None  # a generator of endless examples
    records: Callable[[], list[tuple[str, str]]] | None = None  # or a finite dataset


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "json_extract", "copy name, age and city from a sentence into one fixed JSON shape", _json_extract
        ),
        Task("reverse_words", "reverse the order of three words", _reverse_words),
        Task("uppercase_json", 'three words upper-cased into {"words": [...]}', _uppercase_json),
        Task(
            "iso_alpha3",
            "real data (pycountry's ISO 3166-1): country name -> alpha-3 code; 64 countries held out",
            records=_iso_alpha3,
        ),
    )
}


def generate(
    task: str, n_train: int, n_eval: int, seed: int = 0, should_stop: Callable[[], bool] | None = None
) -> tuple[list[Record], list[Record]]:
    """Train and held-out chat records ({"messages": [user, assistant]}); no eval prompt is in train.
    `should_stop` is polled every _POLL examples (a few ms): a cancel stops a large n_train at once."""
    if task not in TASKS:
        raise ValueError(f"data: unknown task {task!r} (built-in tasks: {', '.join(sorted(TASKS))})")
    if TASKS[task].records is not None:
        return _split_finite(task, n_train, n_eval, seed)
    make = TASKS[task].make
    assert make is not None
    # Separate streams per split: the train set does not change when n_eval does, and vice versa.
    train_rng, eval_rng = random.Random(f"{task}/train/{seed}"), random.Random(f"{task}/eval/{seed}")
    train = []
    for i in range(n_train):
        if i % _POLL == 0 and should_stop is not None and should_stop():
            raise Cancelled()
        train.append(make(train_rng))
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


def _split_finite(task: str, n_train: int, n_eval: int, seed: int) -> tuple[list[Record], list[Record]]:
    """A seeded shuffle; the first max(EVAL_POOL, n_eval) items are held out whatever n_eval is, so the train
    set does not change when n_eval does. n_train beyond what is left is capped (a finite set)."""
    load = TASKS[task].records
    assert load is not None
    items = load()
    random.Random(f"{task}/split/{seed}").shuffle(items)
    pool = max(EVAL_POOL, n_eval)
    if pool >= len(items):
        raise ValueError(f"task {task}: n_eval {n_eval} leaves nothing of its {len(items)} items to train on")
    held, train = items[:pool][:n_eval], items[pool:][:n_train]
    return [_chat(p, a) for p, a in train], [_chat(p, a) for p, a in held]


def _chat(prompt: str, answer: str) -> Record:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
