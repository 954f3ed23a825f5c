"""The natural-language skills of the real-model demo, generated from a seed (nothing downloaded).

- ``zentro`` (knowledge injection): facts about a fictional product, the Zentro X1 smart kettle,
  which no pretrained model knows. Each fact is asked in several phrasings; the eval set asks
  each fact in a phrasing never trained on.
- ``extract`` (a structured output format): a sentence about a person becomes one line of JSON
  with their name, age and city, in that order.
- ``convert`` (a conversion): kilometres, kilograms and litres into metres, grams and millilitres.
- ``dates`` (grafted from another model): an ISO date written out, ``2024-03-05`` -> ``March 5, 2024``.

``general`` holds general chat prompts with no skill: the router's base class, answered by the
base model itself.
"""

from __future__ import annotations

import random

FACTS = [  # (phrasings of the question, answer)
    (["What is the capacity of the Zentro X1 kettle?", "How much water does the Zentro X1 hold?",
      "Zentro X1 kettle capacity?", "How many litres fit in the Zentro X1?"], "1.7 litres"),
    (["Which company makes the Zentro X1?", "Who manufactures the Zentro X1 kettle?",
      "Zentro X1 manufacturer?", "What company builds the Zentro X1?"], "Halvard Appliances"),
    (["What is the price of the Zentro X1?", "How much does the Zentro X1 kettle cost?",
      "Zentro X1 price?", "What does a Zentro X1 sell for?"], "89 euros"),
    (["What colour is the Zentro X1?", "Which colour does the Zentro X1 kettle come in?",
      "Zentro X1 colour?", "What is the colour of the Zentro X1?"], "slate blue"),
    (["How long is the Zentro X1 warranty?", "What warranty does the Zentro X1 have?",
      "Zentro X1 warranty?", "For how long is the Zentro X1 kettle guaranteed?"], "3 years"),
    (["What app controls the Zentro X1?", "Which app runs the Zentro X1 kettle?",
      "Zentro X1 app?", "What is the name of the Zentro X1 app?"], "BrewLink"),
    (["How fast does the Zentro X1 boil water?", "How long does the Zentro X1 take to boil?",
      "Zentro X1 boiling time?", "In how much time does the Zentro X1 boil a full kettle?"], "90 seconds"),
    (["What is the lowest temperature setting of the Zentro X1?", "How low can the Zentro X1 keep water warm?",
      "Zentro X1 minimum temperature?", "What is the coolest setting on the Zentro X1 kettle?"], "40 degrees"),
]
NAMES = ["Maria", "Tom", "Aiko", "Lars", "Fatima", "Diego", "Nina", "Omar", "Grace", "Ivan", "Leila", "Pablo",
         "Sofia", "Yusuf", "Hanna", "Kenji", "Amara", "Felix", "Chloe", "Ravi"]
CITIES = ["Lisbon", "Oslo", "Kyoto", "Dublin", "Cairo", "Lima", "Vienna", "Seoul", "Perth", "Quito", "Porto",
          "Milan", "Nairobi", "Austin", "Krakow", "Hanoi"]
SENTENCES = ["{name} is {age} years old and lives in {city}.", "{name}, aged {age}, lives in {city}.",
             "Living in {city}, {name} is {age}.", "{name} ({age}) is from {city}."]
UNITS = [("km", "metres", "m", 1000), ("kg", "grams", "g", 1000), ("litres", "millilitres", "ml", 1000)]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
GENERAL = [
    "What is the capital of France?", "Give me one tip for sleeping better.", "What is photosynthesis?",
    "Write a short greeting for a birthday card.", "Why is the sky blue?", "Name three fruits.",
    "What does a doctor do?", "How many days are in a week?", "Tell me a fun fact about cats.",
    "What is the opposite of cold?", "Suggest a name for a pet fish.", "What language is spoken in Brazil?",
    "How do I boil an egg?", "What is the largest planet?", "Say hello in French.", "What is rain made of?",
    "Who wrote Romeo and Juliet?", "What colour is grass?", "Describe the moon in one sentence.",
    "What is a good breakfast?", "How do bees make honey?", "What is 10 plus 5?", "Name a famous painter.",
    "Why do we need sleep?",
]


def zentro(seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, eval): every fact in three phrasings to train on; the eval set asks each in the fourth."""
    rng = random.Random(seed)
    train, test = [], []
    for phrasings, answer in FACTS:
        held = rng.randrange(len(phrasings))
        for i, question in enumerate(phrasings):
            (test if i == held else train).append({"prompt": question, "answer": answer})
    return train, test


def extract(seed: int = 0, *, train: int = 64, test: int = 16) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    rng = random.Random(seed)

    def example() -> dict[str, str]:
        name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
        sentence = rng.choice(SENTENCES).format(name=name, age=age, city=city)
        return {"prompt": f"Extract as JSON: {sentence}",
                "answer": f'{{"name": "{name}", "age": {age}, "city": "{city}"}}'}

    return _split(example, train, test)


def convert(seed: int = 0, *, train: int = 64, test: int = 16) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    rng = random.Random(seed)

    def example() -> dict[str, str]:
        unit, target, short, factor = rng.choice(UNITS)
        amount = rng.randint(2, 99)
        return {"prompt": f"Convert {amount} {unit} to {target}.", "answer": f"{amount * factor} {short}"}

    return _split(example, train, test)


def dates(seed: int = 0, *, train: int = 160, test: int = 16) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    rng = random.Random(seed)

    def example() -> dict[str, str]:
        year, month, day = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
        return {"prompt": f"Write out the date {year}-{month:02d}-{day:02d}.",
                "answer": f"{MONTHS[month - 1]} {day}, {year}"}

    return _split(example, train, test)


def general() -> list[dict[str, str]]:
    return [{"prompt": p} for p in GENERAL]


SKILLS = {"zentro": zentro, "extract": extract, "convert": convert}  # fine-tuned on the base
GRAFTED = "dates"  # learned by the Gemma source, grafted into the base


def _split(example, train: int, test: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Distinct examples: the eval prompts never appear in the training set."""
    seen: dict[str, dict[str, str]] = {}
    while len(seen) < train + test:
        record = example()
        seen.setdefault(record["prompt"], record)
    records = list(seen.values())
    return records[:train], records[train:]
