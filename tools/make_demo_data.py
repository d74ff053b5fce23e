"""Generate the demo's preference dataset: concise, direct answers beat rambling padded ones.

Run ``python tools/make_demo_data.py`` to rewrite ``preferences.jsonl`` and
``heldout_prompts.json`` in service/cli/demo_data/ (deterministic; no network). Every row pairs one
question with a one-sentence answer (chosen) and the same facts buried in filler (rejected):
half the rejected answers open with the very same sentence and then keep talking, so the
clearest thing DPO can learn is to stop once the question is answered. The held-out prompts
ask things none of the training rows ask, so the demo measures a habit, not memorised text.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "service" / "cli" / "demo_data"
SEED = 7

# (question, concise answer, topic for the padding)
Item = tuple[str, str, str]

CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Canada", "Ottawa"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Argentina", "Buenos Aires"),
    ("Chile", "Santiago"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"),
    ("India", "New Delhi"),
    ("China", "Beijing"),
    ("Russia", "Moscow"),
    ("Mexico", "Mexico City"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Hungary", "Budapest"),
    ("Cuba", "Havana"),
    ("Morocco", "Rabat"),
]

ANIMAL_LEGS = [
    ("a dog", "four"),
    ("a chicken", "two"),
    ("an ant", "six"),
    ("a horse", "four"),
    ("a beetle", "six"),
    ("an octopus", "eight arms and no"),
    ("a cow", "four"),
    ("a duck", "two"),
    ("a cat", "four"),
    ("a bee", "six"),
]

ANIMAL_YOUNG = [
    ("cat", "a kitten"),
    ("dog", "a puppy"),
    ("cow", "a calf"),
    ("sheep", "a lamb"),
    ("horse", "a foal"),
    ("goat", "a kid"),
    ("frog", "a tadpole"),
    ("kangaroo", "a joey"),
    ("duck", "a duckling"),
    ("bear", "a cub"),
    ("deer", "a fawn"),
    ("goose", "a gosling"),
]

ANTONYMS = [
    ("hot", "cold"),
    ("tall", "short"),
    ("fast", "slow"),
    ("early", "late"),
    ("empty", "full"),
    ("light", "dark"),
    ("open", "closed"),
    ("happy", "sad"),
    ("strong", "weak"),
    ("rich", "poor"),
    ("loud", "quiet"),
    ("old", "young"),
    ("wet", "dry"),
    ("hard", "soft"),
    ("cheap", "expensive"),
    ("begin", "end"),
    ("win", "lose"),
    ("push", "pull"),
    ("thick", "thin"),
    ("above", "below"),
]

SYMBOLS = [
    ("oxygen", "O"),
    ("hydrogen", "H"),
    ("carbon", "C"),
    ("nitrogen", "N"),
    ("sodium", "Na"),
    ("iron", "Fe"),
    ("gold", "Au"),
    ("silver", "Ag"),
    ("copper", "Cu"),
    ("helium", "He"),
    ("calcium", "Ca"),
    ("potassium", "K"),
    ("lead", "Pb"),
    ("zinc", "Zn"),
]

BOOKS = [
    ("Pride and Prejudice", "Jane Austen"),
    ("1984", "George Orwell"),
    ("Moby-Dick", "Herman Melville"),
    ("The Odyssey", "Homer"),
    ("Hamlet", "William Shakespeare"),
    ("War and Peace", "Leo Tolstoy"),
    ("Don Quixote", "Miguel de Cervantes"),
    ("The Adventures of Tom Sawyer", "Mark Twain"),
    ("Great Expectations", "Charles Dickens"),
    ("Frankenstein", "Mary Shelley"),
    ("The Old Man and the Sea", "Ernest Hemingway"),
    ("Jane Eyre", "Charlotte Bronte"),
]

SPANISH = [
    ("hello", "hola"),
    ("cat", "gato"),
    ("water", "agua"),
    ("house", "casa"),
    ("book", "libro"),
    ("dog", "perro"),
    ("good morning", "buenos dias"),
    ("friend", "amigo"),
    ("red", "rojo"),
    ("bread", "pan"),
]

FRENCH = [
    ("hello", "bonjour"),
    ("cat", "chat"),
    ("water", "eau"),
    ("house", "maison"),
    ("book", "livre"),
    ("thank you", "merci"),
    ("yes", "oui"),
    ("apple", "pomme"),
]

PLURALS = [
    ("mouse", "mice"),
    ("child", "children"),
    ("tooth", "teeth"),
    ("foot", "feet"),
    ("goose", "geese"),
    ("man", "men"),
    ("woman", "women"),
    ("person", "people"),
    ("leaf", "leaves"),
    ("knife", "knives"),
    ("box", "boxes"),
    ("city", "cities"),
]

PAST_TENSE = [
    ("go", "went"),
    ("eat", "ate"),
    ("run", "ran"),
    ("see", "saw"),
    ("write", "wrote"),
    ("swim", "swam"),
    ("buy", "bought"),
    ("think", "thought"),
    ("take", "took"),
    ("sing", "sang"),
    ("drink", "drank"),
    ("fly", "flew"),
    ("begin", "began"),
    ("catch", "caught"),
]

DEFINITIONS = [
    ("a noun", "A noun is a word that names a person, place, thing or idea."),
    ("a verb", "A verb is a word that describes an action or a state."),
    ("photosynthesis", "Photosynthesis is how plants turn light, water and CO2 into sugar."),
    ("gravity", "Gravity is the force that pulls objects with mass toward each other."),
    ("a prime number", "A prime number has exactly two divisors: 1 and itself."),
    ("an island", "An island is a piece of land surrounded by water."),
    ("a mammal", "A mammal is a warm-blooded animal that feeds its young with milk."),
    ("evaporation", "Evaporation is when a liquid turns into a gas."),
    ("a triangle", "A triangle is a shape with three sides and three angles."),
    (
        "democracy",
        "Democracy is government by the people, usually through elected representatives.",
    ),
    ("a synonym", "A synonym is a word that means the same as another word."),
    ("a volcano", "A volcano is an opening in the Earth's crust where lava erupts."),
    ("an atom", "An atom is the smallest unit of a chemical element."),
    ("inflation", "Inflation is a general rise in prices over time."),
    ("a glacier", "A glacier is a slowly moving mass of ice."),
    ("a fraction", "A fraction is a number that represents part of a whole."),
    ("an orbit", "An orbit is the curved path of one object around another in space."),
    ("a habitat", "A habitat is the natural home of an animal or plant."),
]

FACTS: list[Item] = [
    ("How many days are in a week?", "There are seven days in a week.", "the calendar"),
    ("How many months are in a year?", "There are twelve months in a year.", "the calendar"),
    ("How many hours are in a day?", "There are 24 hours in a day.", "time"),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour.", "time"),
    ("How many seconds are in a minute?", "There are 60 seconds in a minute.", "time"),
    ("What is the largest planet in our solar system?", "Jupiter is the largest.", "astronomy"),
    ("Which planet is closest to the Sun?", "Mercury is closest to the Sun.", "astronomy"),
    ("Which planet is known as the Red Planet?", "Mars is the Red Planet.", "astronomy"),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest.", "the ocean"),
    ("What is the freezing point of water in Celsius?", "Water freezes at 0 °C.", "water"),
    ("What color do you get by mixing blue and yellow?", "You get green.", "color"),
    ("What color do you get by mixing red and white?", "You get pink.", "color"),
    ("What color do you get by mixing red and blue?", "You get purple.", "color"),
    ("What is the tallest animal?", "The giraffe is the tallest animal.", "animal life"),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal.", "animal life"),
    ("What is the largest mammal?", "The blue whale is the largest mammal.", "animal life"),
    ("What do bees make?", "Bees make honey and beeswax.", "beekeeping"),
    ("What is the main ingredient in guacamole?", "Avocado is the main ingredient.", "cooking"),
    ("What is the hardest natural substance?", "Diamond is the hardest.", "geology"),
    ("How many continents are there?", "There are seven continents.", "geography"),
    (
        "What is the longest river in Africa?",
        "The Nile is the longest river in Africa.",
        "geography",
    ),
    ("What language is spoken in Brazil?", "Portuguese is spoken in Brazil.", "language"),
    ("What is the currency of Japan?", "The currency of Japan is the yen.", "money"),
    ("What is the currency of the United Kingdom?", "It is the pound sterling.", "money"),
    ("How many sides does a hexagon have?", "A hexagon has six sides.", "geometry"),
    ("How many sides does an octagon have?", "An octagon has eight sides.", "geometry"),
    ("What is the square root of 81?", "The square root of 81 is 9.", "mathematics"),
    ("What is the square root of 144?", "The square root of 144 is 12.", "mathematics"),
    ("Is a tomato a fruit or a vegetable?", "Botanically, a tomato is a fruit.", "food"),
    ("What organ pumps blood through the body?", "The heart pumps blood.", "the human body"),
    ("How many bones are in the adult human body?", "An adult has 206 bones.", "the human body"),
    ("What is the chemical formula for water?", "The formula for water is H2O.", "chemistry"),
    (
        "What do caterpillars turn into?",
        "Caterpillars turn into butterflies or moths.",
        "insect life",
    ),
    ("Which instrument has 88 keys?", "A standard piano has 88 keys.", "music"),
    ("How many players are on a soccer team on the field?", "Eleven players.", "sports"),
    ("What is the opposite of north?", "The opposite of north is south.", "navigation"),
    ("What season comes after winter?", "Spring comes after winter.", "the weather"),
    ("What do you call a baby chicken?", "A baby chicken is a chick.", "animal life"),
    ("What is 1 kilogram in grams?", "1 kilogram is 1000 grams.", "measurement"),
    ("What is 1 meter in centimeters?", "1 meter is 100 centimeters.", "measurement"),
    ("How do you say goodbye in Italian?", "Goodbye in Italian is 'arrivederci'.", "language"),
    ("What shape has four equal sides and four right angles?", "A square.", "geometry"),
    ("What is the smallest prime number?", "The smallest prime number is 2.", "mathematics"),
    ("What does a compass point to?", "A compass needle points to magnetic north.", "navigation"),
    ("What do you use to measure weight?", "You use a scale.", "measurement"),
    ("Where does the Sun rise?", "The Sun rises in the east.", "the sky"),
]

PREAMBLES = [
    "That's a great question, and it's one that a lot of people wonder about.",
    "Sure! I'd be more than happy to help you with that.",
    "Let me think about this carefully before I give you an answer.",
    "Thank you so much for asking! This is a really interesting topic.",
    "What a wonderful question. There is quite a lot to say here.",
    "Absolutely, I can help with this. Let me walk you through it step by step.",
    "Great question! Before I answer, let me give you a little background.",
    "Of course! This is something I find genuinely fascinating.",
]

RESTATE = [
    "You are asking about {topic}, which is a topic that comes up quite often.",
    "So, when it comes to {topic}, there are a few things worth keeping in mind.",
    "To answer your question about {topic}, we first need to think about it a little.",
    "Questions about {topic} are very common, and it's good that you asked.",
]

FILLERS = [
    "It is worth noting that there are many different factors to consider here.",
    "Many people find {topic} fascinating, and there is a lot more that could be said about it.",
    "This is something that comes up often in everyday life, so it is useful to know.",
    "Of course, there are always exceptions and nuances depending on the context.",
    "In general, it's always a good idea to double-check information like this.",
    "There is a long history behind {topic}, and experts have studied it for many years.",
    "Understanding {topic} can help you in many situations, both at school and at work.",
    "Some people may have different opinions, but the basic facts are well established.",
    "It's important to remember that learning about {topic} is a lifelong journey.",
    "In other words, the answer really depends on how you look at it, in a sense.",
    "As I mentioned above, this is a very interesting question with a lot of depth.",
    "I could go on and on about {topic}, because there is so much to explore.",
]

# On-topic elaboration in the voice small instruct models ramble in: the answer is complete,
# and then it keeps going.
ELABORATIONS = [
    "This is due to the fact that {topic} has been studied for a very long time.",
    "{Topic} plays a vital role in many areas of everyday life.",
    "It is often referred to as one of the most important facts about {topic}.",
    "This is essential to understand, as {topic} can be quite complex.",
    "Additionally, {topic} is typically discussed in schools, books and research.",
    "These details are commonly used in various applications, including education and science.",
    "Overall, {topic} is a fascinating subject with a rich and interesting history.",
    "In fact, many experts agree that {topic} is a significant part of our world today.",
    "This makes {topic} an important topic for students, teachers and researchers alike.",
    "It is also worth mentioning that {topic} has changed in many ways over the years.",
    "The reason for this is closely connected to the history and nature of {topic}.",
    "As a result, {topic} is something that people continue to explore and discuss.",
]

CLOSINGS = [
    "I hope this helps! Let me know if you have any other questions.",
    "Feel free to ask if you would like more details on anything I mentioned.",
    "I hope that answers your question, and please don't hesitate to ask more!",
    "Let me know if there's anything else you'd like to know about {topic}.",
    "Thanks again for such a thoughtful question. Have a wonderful day!",
]

HELDOUT_PROMPTS = [
    "How many legs does a spider have?",
    "What is the largest desert in the world?",
    "What color is the sky on a clear day?",
    "What does a thermometer measure?",
    "Who wrote Romeo and Juliet?",
]


def _items(rng: random.Random) -> Iterator[Item]:
    for country, city in CAPITALS:
        if rng.random() < 0.7:
            answer = f"The capital of {country} is {city}."
            yield (f"What is the capital of {country}?", answer, country)
        else:
            yield (f"Which city is the capital of {country}?", f"{city}.", country)
    for animal, n in ANIMAL_LEGS:
        yield (
            f"How many legs does {animal} have?",
            f"{animal.capitalize()} has {n} legs.",
            "animal life",
        )
    for animal, young in ANIMAL_YOUNG:
        yield (
            f"What is a baby {animal} called?",
            f"A baby {animal} is called {young}.",
            "animal life",
        )
    for word, opposite in ANTONYMS:
        ask = rng.choice(["What is the opposite of '{w}'?", "Give me an antonym for '{w}'."])
        yield (ask.format(w=word), f"The opposite of '{word}' is '{opposite}'.", "vocabulary")
    for element, symbol in SYMBOLS:
        yield (
            f"What is the chemical symbol for {element}?",
            f"The chemical symbol for {element} is {symbol}.",
            "chemistry",
        )
    for title, author in BOOKS:
        yield (f"Who wrote {title}?", f"{title} was written by {author}.", "literature")
    for word, es in SPANISH:
        yield (
            f"How do you say '{word}' in Spanish?",
            f"'{word.capitalize()}' is '{es}'.",
            "Spanish",
        )
    for word, fr in FRENCH:
        yield (f"Translate '{word}' into French.", f"'{fr.capitalize()}'.", "French")
    for word, plural in PLURALS:
        yield (
            f"What is the plural of '{word}'?",
            f"The plural of '{word}' is '{plural}'.",
            "vocabulary",
        )
    for verb, past in PAST_TENSE:
        yield (f"What is the past tense of '{verb}'?", f"The past tense is '{past}'.", "grammar")
    for term, definition in DEFINITIONS:
        yield (
            rng.choice(["What is {t}?", "Define {t}.", "Explain {t} briefly."]).format(t=term),
            definition,
            term,
        )
    yield from FACTS
    yield from _arithmetic(rng)
    yield from _counting(rng)


def _arithmetic(rng: random.Random) -> Iterator[Item]:
    ops: list[tuple[str, Callable[[int, int], int]]] = [
        ("{a} plus {b}", lambda a, b: a + b),
        ("{a} minus {b}", lambda a, b: a - b),
        ("{a} times {b}", lambda a, b: a * b),
    ]
    seen: set[tuple[int, int, str]] = set()
    while len(seen) < 36:
        text, fn = rng.choice(ops)
        a, b = rng.randint(2, 40), rng.randint(2, 12)
        if (a, b, text) in seen or (text.startswith("{a} minus") and a < b):
            continue
        seen.add((a, b, text))
        question = text.format(a=a, b=b)
        yield (f"What is {question}?", f"{question.capitalize()} is {fn(a, b)}.", "arithmetic")


def _counting(rng: random.Random) -> Iterator[Item]:
    words = [
        "apple",
        "river",
        "banana",
        "window",
        "garden",
        "pencil",
        "orange",
        "blanket",
        "mountain",
        "elephant",
        "library",
        "computer",
        "sun",
        "tree",
        "violin",
        "yellow",
    ]
    for word in words:
        ask = rng.choice(["How many letters are in the word '{w}'?", "Spell '{w}' backwards."])
        if ask.startswith("Spell"):
            yield (ask.format(w=word), f"'{word[::-1]}'.", "spelling")
        else:
            yield (
                ask.format(w=word),
                f"'{word.capitalize()}' has {len(word)} letters.",
                "spelling",
            )


def _rambling(answer: str, topic: str, rng: random.Random) -> str:
    """The same answer, then more: elaboration, filler, a preamble or a sign-off.

    Most rejected answers are the chosen one plus a sentence or two, so the clearest thing
    to learn is to stop once the question is answered; short rows keep a CPU step cheap.
    """
    fmt = {"topic": topic, "Topic": topic[:1].upper() + topic[1:]}
    more = [e.format(**fmt) for e in rng.sample(ELABORATIONS, 2)]
    style = rng.random()
    if style < 0.45:  # answers, then cannot stop
        parts = [answer, *more[: rng.randint(1, 2)]]
    elif style < 0.65:
        parts = [answer, more[0], rng.choice(FILLERS).format(**fmt)]
    elif style < 0.8:
        parts = [answer, more[0], rng.choice(CLOSINGS).format(**fmt)]
    elif style < 0.9:
        parts = [rng.choice(PREAMBLES), answer, more[0]]
    else:
        parts = [rng.choice(RESTATE).format(**fmt), answer, more[0]]
    return " ".join(parts)


def rows(seed: int = SEED) -> list[dict[str, str]]:
    rng = random.Random(seed)
    heldout = {p.lower() for p in HELDOUT_PROMPTS}
    out = []
    for prompt, answer, topic in _items(rng):
        assert prompt.lower() not in heldout, prompt
        out.append({"prompt": prompt, "chosen": answer, "rejected": _rambling(answer, topic, rng)})
    rng.shuffle(out)
    return out


def main() -> None:
    data = rows()
    with (HERE / "preferences.jsonl").open("w") as f:
        for row in data:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (HERE / "heldout_prompts.json").write_text(json.dumps(HELDOUT_PROMPTS, indent=2) + "\n")
    print(f"{len(data)} rows, {len(HELDOUT_PROMPTS)} held-out prompts")


if __name__ == "__main__":
    main()
