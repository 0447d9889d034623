"""Small deterministic texts written by the tests (never corpus text from ../shared)."""
import random

NAMES = ["Mary", "John", "London", "Paris", "Alice", "Robert", "Berlin", "Sarah", "Thomas", "Vienna"]
VERBS = ["met", "saw", "called", "thanked", "followed", "visited", "helped", "watched"]
NOUNS = ["friend", "teacher", "brother", "sister", "doctor", "neighbour", "captain"]


def sentence(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    v = rng.choice(VERBS)
    n = rng.choice(NOUNS)
    forms = [
        f"{a} {v} her {n} in {b}.",
        f"When {a} arrived, {b} {v} her again.",
        f"The {n} of {a} {v} her near {b} on Monday.",
        f"{a} said that her {n} lived in {b} for years.",
    ]
    return rng.choice(forms)


def write_corpus(path, n_rows: int = 40, seed: int = 0) -> str:
    """A text file with one paragraph per line, headings like WikiText's, names and ' her' throughout."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_rows):
        if i % 10 == 0:
            lines.append(f" = {rng.choice(NAMES)} {rng.choice(NOUNS)} = ")
        else:
            lines.append(" " + " ".join(sentence(rng) for _ in range(rng.randint(2, 4))) + " ")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)
