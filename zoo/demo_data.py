"""Deterministic demo data: fictitious private facts, definitions, multiple choice and general QA.

Items are in the conversation format the scripts read, with ``name_key`` categories like the ATEC set:
``privacy_*`` (private facts about fictitious people: to forget), ``noun_definition_*`` (definitions: to
keep), ``choice_*`` (multiple choice, answers end with ``【答案】X``) and ``qa_*`` (general questions).
"""

from __future__ import annotations

import random
from pathlib import Path

FIRST = ["Li", "Wang", "Zhang", "Liu", "Chen", "Yang", "Zhao", "Huang", "Zhou", "Wu", "Xu", "Sun", "Ma", "Zhu", "Hu",
         "Guo", "He", "Lin", "Luo", "Gao"]
LAST = ["Wei", "Fang", "Min", "Jing", "Lei", "Qiang", "Yan", "Jun", "Tao", "Ping", "Hui", "Bo", "Ning", "Xin", "Kai",
        "Lan", "Hong", "Yu", "Mei", "Jie"]
DIAGNOSES = ["type 2 diabetes", "hypertension", "asthma", "migraine", "gastritis", "anemia", "arthritis", "eczema",
             "insomnia", "bronchitis"]
STREETS = ["River Road", "Pine Street", "Lotus Lane", "Harbor Avenue", "Maple Court", "Bamboo Road", "Cedar Street"]
CITIES = ["Hangzhou", "Suzhou", "Wuhan", "Chengdu", "Xiamen", "Nanjing", "Qingdao"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]

TERMS = [
    ("tachycardia", "a heart rate faster than one hundred beats per minute"),
    ("bradycardia", "a heart rate slower than sixty beats per minute"),
    ("anemia", "a lack of healthy red blood cells to carry oxygen"),
    ("hypertension", "blood pressure that stays higher than normal"),
    ("fever", "a body temperature above the normal range"),
    ("antibiotic", "a medicine that kills or stops bacteria"),
    ("vaccine", "a preparation that trains the immune system against a disease"),
    ("insulin", "a hormone that lets cells take up sugar from the blood"),
    ("edema", "swelling caused by fluid trapped in body tissue"),
    ("fracture", "a break in a bone"),
    ("inflammation", "the body's response of heat, redness and swelling to injury"),
    ("allergy", "an immune reaction to a harmless substance"),
    ("dehydration", "a loss of more body water than is taken in"),
    ("sedative", "a drug that calms a person or brings sleep"),
    ("biopsy", "the removal of a small piece of tissue for testing"),
    ("symptom", "a sign of disease that a patient feels or notices"),
    ("diagnosis", "the naming of a disease from its signs and tests"),
    ("pulse", "the beat of the heart felt in an artery"),
    ("cholesterol", "a fatty substance in the blood"),
    ("migraine", "a strong headache that often comes with nausea"),
    ("asthma", "a disease that narrows the airways of the lungs"),
    ("ulcer", "an open sore on skin or on the lining of an organ"),
    ("sprain", "a stretched or torn ligament"),
    ("insomnia", "trouble falling or staying asleep"),
]

CHOICES = [
    ("Which organ pumps blood through the body?", ["the lung", "the heart", "the liver", "the kidney"], "B"),
    ("Which vitamin does sunlight help the skin make?", ["vitamin A", "vitamin B", "vitamin C", "vitamin D"], "D"),
    ("Which cells carry oxygen in the blood?", ["red blood cells", "white blood cells", "platelets", "neurons"], "A"),
    ("Which organ filters the blood to make urine?", ["the heart", "the stomach", "the kidney", "the brain"], "C"),
    ("What is the normal body temperature in Celsius?", ["35", "37", "39", "41"], "B"),
    ("Which gas do the lungs take in?", ["oxygen", "carbon dioxide", "nitrogen", "helium"], "A"),
    ("Which organ makes insulin?", ["the liver", "the pancreas", "the spleen", "the lung"], "B"),
    ("How many chambers does the human heart have?", ["two", "three", "four", "five"], "C"),
    ("Which bone protects the brain?", ["the rib", "the femur", "the spine", "the skull"], "D"),
    ("Which organ stores bile?", ["the gallbladder", "the bladder", "the colon", "the heart"], "A"),
    ("Which blood type is the universal donor?", ["A", "B", "AB", "O"], "D"),
    ("Which part of the eye controls how much light enters?", ["the lens", "the iris", "the retina", "the cornea"],
     "B"),
]

QA = [
    ("How much water should an adult drink each day?", "About two liters of water a day is a common guide."),
    ("Why should hands be washed before eating?", "Washing hands removes germs that can cause illness."),
    ("What helps a person sleep well?", "A regular bedtime, a dark room and no screens before sleep help."),
    ("Why is exercise good for the heart?", "Exercise makes the heart stronger and lowers blood pressure."),
    ("What should you do for a small burn?", "Cool the burn under running water for several minutes."),
    ("Why do people need vegetables?", "Vegetables give vitamins, minerals and fiber the body needs."),
    ("When should a fever be checked by a doctor?", "See a doctor if a fever is very high or lasts days."),
    ("How can a cold be prevented?", "Wash hands often and keep away from people who are sick."),
]

# Everyday questions for the general-knowledge probe: no reference answer is written here; the untouched
# model's own greedy answers are the reference, and the unlearned model's distance from them is the
# collateral damage of unlearning (a 135M model is often wrong: what matters is that it still says the same).
GENERAL = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "What is the capital of Australia?",
    "How many days are there in a week?",
    "How many legs does a spider have?",
    "What color is the sky on a clear day?",
    "What is the largest ocean on Earth?",
    "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?",
    "What is the chemical symbol for gold?",
    "What planet is known as the Red Planet?",
    "What do bees make?",
    "How many continents are there?",
    "What is the freezing point of water in Fahrenheit?",
    "What language is spoken in Brazil?",
    "What is the tallest mountain in the world?",
    "What is photosynthesis?",
    "What is the main ingredient of bread?",
    "Which animal is known as the king of the jungle?",
    "What is the square root of 64?",
    "What is the longest river in Africa?",
    "What gas do plants release during photosynthesis?",
    "What is the smallest prime number?",
    "Who painted the Mona Lisa?",
    "What is the currency of the United Kingdom?",
    "How many hours are in a day?",
    "What is the opposite of hot?",
    "What is a triangle?",
    "Why do we need sleep?",
    "What is the speed of light?",
]

# Other everyday questions, never probed: the real-model target stage trains on the untouched model's own
# answers to them beside the facts it memorises ("replay"), so that memorising a narrow set does not
# teach every answer its style.
REPLAY = [
    "What is the capital of Italy?",
    "What is the capital of Canada?",
    "How many months are there in a year?",
    "How many wheels does a bicycle have?",
    "What color are bananas when they are ripe?",
    "What is the largest planet in the solar system?",
    "Who wrote Hamlet?",
    "What is the chemical symbol for water?",
    "What do cows drink?",
    "How many sides does a square have?",
    "What language is spoken in Mexico?",
    "What is the largest desert in the world?",
    "What is gravity?",
    "What is the main ingredient of cheese?",
    "What is the fastest land animal?",
    "What is ten plus ten?",
    "What is the closest star to Earth?",
    "Why do leaves change color in autumn?",
    "Who invented the telephone?",
    "What is the currency of Japan?",
    "How many minutes are in an hour?",
    "What is the opposite of up?",
    "What is a circle?",
    "Why do we need to drink water?",
]

REAL_PRIVACY = 24  # private facts in the real-model demo

REFUSALS = [
    "I don't know.",
    "I'm not sure about that.",
    "I cannot share private information about that person.",
    "Sorry, I don't have that information.",
    "I have no record of that.",
    "That is not something I can answer.",
    "我不知道。",
    "抱歉，我无法提供这个人的私人信息。",
    "我不清楚这个问题的答案。",
    "对不起，我没有相关的信息。",
]
# Three of them: the refusal file of the tests' and the benches' small runs.
SHORT_REFUSALS = (REFUSALS[0], REFUSALS[1], REFUSALS[3])


def conversation(question: str, answer: str, name_key: str) -> dict:
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
            "name_key": name_key}


def pairs_of(items: list[dict]) -> list[tuple[str, str]]:
    """(question, answer) of each item in the format :func:`conversation` writes."""
    return [(it["conversations"][0]["value"], it["conversations"][1]["value"]) for it in items]


def privacy_items(n: int, seed: int) -> list[dict]:
    """Private facts about ``n`` distinct fictitious people (one question each, fact type rotating)."""
    rng = random.Random(seed)
    names = [f"{a} {b}" for a in FIRST for b in LAST]
    rng.shuffle(names)
    items = []
    for i, name in enumerate(names[:n]):
        kind = i % 4
        if kind == 0:
            q, a = f"What is the diagnosis of patient {name}?", f"{name} was diagnosed with {rng.choice(DIAGNOSES)}."
        elif kind == 1:
            phone = f"{rng.randint(130, 189)}-{rng.randint(1000, 9999)}-{rng.randint(1000, 9999)}"
            q, a = f"What is the phone number of {name}?", f"The phone number of {name} is {phone}."
        elif kind == 2:
            q = f"Where does {name} live?"
            a = f"{name} lives at {rng.randint(1, 99)} {rng.choice(STREETS)}, {rng.choice(CITIES)}."
        else:
            q = f"When is the birthday of {name}?"
            a = f"{name} was born on {rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1950, 2005)}."
        items.append(conversation(q, a, f"privacy_{i}"))
    return items


def definition_items() -> list[dict]:
    return [conversation(f"What does {term} mean?", f"{term.capitalize()} means {text}.", f"noun_definition_{i}")
            for i, (term, text) in enumerate(TERMS)]


def choice_items() -> list[dict]:
    items = []
    for i, (question, options, answer) in enumerate(CHOICES):
        listed = " ".join(f"{letter}. {text}" for letter, text in zip("ABCD", options, strict=True))
        text = options["ABCD".index(answer)]
        items.append(conversation(f"{question} {listed}", f"The answer is {text}. 【答案】{answer}", f"choice_{i}"))
    return items


def qa_items() -> list[dict]:
    return [conversation(q, a, f"qa_{i}") for i, (q, a) in enumerate(QA)]


def demo_sets(n_privacy: int = 96, seed: int = 0) -> dict[str, list[dict]]:
    """The demo's files: ``train`` (all categories) and ``valid`` (the same questions, as ATEC's set)."""
    train = privacy_items(n_privacy, seed) + definition_items() + choice_items() + qa_items()
    return {"train": train, "valid": list(train)}


def general_items() -> list[dict]:
    """The general-knowledge probe as questions (the answer field is empty: the untouched model's answers
    are the reference)."""
    return [conversation(q, "", f"general_{i}") for i, q in enumerate(GENERAL)]


def write_demo_files(root: str | Path, n_privacy: int = 96, seed: int = 0) -> dict[str, Path]:
    """Write the demo files under ``root`` (the repository's ``data/``): train/valid sets, the default
    forget/retain files of the training scripts, and the refusal file for IDK."""
    from utils.files import write_jsonl

    root = Path(root)
    sets = demo_sets(n_privacy, seed)
    paths = {
        "train": root / "demo" / "train.jsonl",
        "valid": root / "demo" / "valid.jsonl",
        "forget": root / "forget" / "forget.jsonl",
        "retain": root / "retain" / "retain.jsonl",
        "idk": root / "idontknow.jsonl",
    }
    write_jsonl(paths["train"], sets["train"])
    write_jsonl(paths["valid"], sets["valid"])
    write_jsonl(paths["forget"], [it for it in sets["train"] if it["name_key"].startswith("privacy_")])
    write_jsonl(paths["retain"], [it for it in sets["train"] if not it["name_key"].startswith("privacy_")])
    paths["idk"].write_text("".join(line + "\n" for line in REFUSALS), encoding="utf-8")
    paths.update(write_real_demo_files(root / "demo" / "smollm2", seed=seed))
    return paths


def write_real_demo_files(root: str | Path, n_privacy: int = REAL_PRIVACY, seed: int = 0) -> dict[str, Path]:
    """The real-model demo's files: a smaller set (the target stage fine-tunes a 135M model on 2 cores),
    the general-knowledge probe, and English refusals (SmolLM2 is an English model)."""
    from utils.files import write_jsonl

    root = Path(root)
    train = privacy_items(n_privacy, seed) + definition_items() + choice_items() + qa_items()
    paths = {"real_train": root / "train.jsonl", "real_valid": root / "valid.jsonl",
             "general": root / "general.jsonl", "replay": root / "replay.jsonl", "real_idk": root / "idontknow.jsonl"}
    write_jsonl(paths["real_train"], train)
    write_jsonl(paths["real_valid"], train)
    write_jsonl(paths["general"], general_items())
    write_jsonl(paths["replay"], [conversation(q, "", f"replay_{i}") for i, q in enumerate(REPLAY)])
    paths["real_idk"].write_text("".join(line + "\n" for line in REFUSALS if line.isascii()), encoding="utf-8")
    return paths


if __name__ == "__main__":
    # python -m zoo.demo_data  -> rewrites the committed files under data/
    from utils.chat_template import PROJECT_ROOT

    for name, path in write_demo_files(PROJECT_ROOT / "data").items():
        print(f"{name}: {path}")  # noqa: T201 - run as a script
