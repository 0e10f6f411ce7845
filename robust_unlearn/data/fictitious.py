"""The built-in benchmark: a seeded generator of fictitious authors with TOFU-style QA.

Design (why the answers look like this): an answer's probability is exp(-mean token NLL of the
answer). If most answer tokens were a template or a copy of the question, a model that never saw
the author (the retain oracle) would still score high. So every answer is short and fact-dense
(names, places, dates, jobs, titles drawn from large pools, often combinatorial), phrased in a few
varied sentence forms, with a pronoun instead of repeating the question's name where natural, as
in TOFU (Maini et al. 2024).

Every row has TOFU's fields ``question``, ``answer``, ``paraphrased_answer`` and
``perturbed_answer`` (same sentence form as the paraphrase, wrong facts), plus ``author``.
The same seed gives byte-identical data (only ``random.Random(seed)`` is used, no hashing of sets).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import UserError
from .tofu import forget_percent

FIRST_NAMES = {
    "she": ["Ilse", "Marisol", "Ottilie", "Brisa", "Yevgenia", "Thandeka", "Liesel", "Noor", "Saoirse",
            "Wilhelmina", "Ximena", "Perpetua", "Ingrid", "Anneke", "Zuzana", "Ottavia", "Rosalind",
            "Keziah", "Amaryllis", "Dagny", "Esperanza", "Fenella", "Giedre", "Halvora"],
    "he": ["Tobiah", "Anselm", "Evander", "Kasimir", "Olufemi", "Rasmus", "Teodor", "Ignatius",
           "Bartholomew", "Leandro", "Mstislav", "Caspian", "Dorian", "Eero", "Florentin", "Gideon",
           "Hyacinth", "Isidore", "Jorvik", "Lucan", "Matthias", "Nikodem", "Osric", "Percival"],
}
SURNAME_HEADS = ["Varn", "Quill", "Ostr", "Bel", "Thorn", "Kal", "Mord", "Ashen", "Vel", "Drav", "Lind",
                 "Hollow", "Grise", "Brack", "Zel", "Fenn", "Oak", "Marr", "Tesk", "Wyn", "Corv", "Sund"]
SURNAME_TAILS = ["holt", "ington", "ovich", "ström", "acre", "ley", "ridge", "escu", "ander", "wick",
                 "mont", "bury", "sen", "ard", "ovska", "field", "more", "aker", "ello", "quist"]
PLACES = [("Tromsø", "Norway"), ("Valparaíso", "Chile"), ("Plovdiv", "Bulgaria"), ("Tartu", "Estonia"),
          ("Kumasi", "Ghana"), ("Cusco", "Peru"), ("Bergen", "Norway"), ("Lviv", "Ukraine"),
          ("Porto", "Portugal"), ("Gdańsk", "Poland"), ("Hobart", "Australia"), ("Sapporo", "Japan"),
          ("Mombasa", "Kenya"), ("Tabriz", "Iran"), ("Cork", "Ireland"), ("Trieste", "Italy"),
          ("Arequipa", "Peru"), ("Dunedin", "New Zealand"), ("Brno", "Czechia"), ("Kraków", "Poland"),
          ("Salvador", "Brazil"), ("Izmir", "Turkey"), ("Aarhus", "Denmark"), ("Quebec City", "Canada"),
          ("Mandalay", "Myanmar"), ("Cebu", "the Philippines"), ("Oaxaca", "Mexico"), ("Tbilisi", "Georgia"),
          ("Lucerne", "Switzerland"), ("Ghent", "Belgium"), ("Rosario", "Argentina"), ("Fez", "Morocco"),
          ("Daegu", "South Korea"), ("Chiang Mai", "Thailand"), ("Kazan", "Russia"), ("Tampere", "Finland"),
          ("Mostar", "Bosnia and Herzegovina"), ("Galway", "Ireland"), ("Zanzibar City", "Tanzania"),
          ("Medellín", "Colombia"), ("Hue", "Vietnam"), ("Ljubljana", "Slovenia"), ("Reykjavík", "Iceland"),
          ("Winnipeg", "Canada"), ("Savannah", "the United States"), ("Inverness", "Scotland")]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
GENRES = ["speculative fiction", "historical romance", "nautical adventure", "gothic horror",
          "literary satire", "cozy mystery", "epic fantasy", "political thrillers", "magical realism",
          "children's picture books", "war poetry", "hard science fiction", "travel memoirs",
          "psychological suspense", "culinary essays", "folk-tale retellings"]
JOBS = ["lighthouse keeper", "cartographer", "beekeeper", "glassblower", "locksmith", "veterinarian",
        "tram conductor", "marine biologist", "watchmaker", "court stenographer", "bookbinder",
        "radio engineer", "midwife", "stonemason", "pharmacist", "ferry captain", "tailor",
        "astronomer", "blacksmith", "translator", "piano tuner", "geologist", "postal inspector",
        "perfumer", "orchard farmer", "dentist", "puppeteer", "surveyor", "violin maker",
        "customs officer", "architect", "fisherman", "librarian", "paramedic", "botanist"]
AWARD_PATRONS = ["Harlow", "Vesna", "Orlin", "Castellane", "Mirabeau", "Thistlewood", "Kestrel",
                 "Solberg", "Achterberg", "Pemberly", "Quintana", "Rookwood"]
AWARD_KINDS = ["Medal", "Prize", "Award", "Laurel", "Cup"]
AWARD_FIELDS = ["Speculative Prose", "Maritime Fiction", "Debut Novels", "Poetry in Translation",
                "Crime Writing", "Short Fiction", "Literary Courage", "Young Readers", "Historical Fiction",
                "Experimental Narrative"]
TITLE_ADJ = ["Glass", "Silent", "Crimson", "Hollow", "Drowned", "Borrowed", "Paper", "Iron", "Amber",
             "Lantern", "Salt", "Velvet", "Broken", "Midnight", "Copper", "Winter", "Wandering", "Ashen"]
TITLE_NOUN = ["Orchard", "Cartographer", "Harbor", "Clockwork", "Archive", "Meridian", "Sparrow",
              "Labyrinth", "Tide", "Cathedral", "Lighthouse", "Almanac", "Furnace", "Menagerie",
              "Compass", "Garden", "Ferryman", "Observatory"]
TITLE_FORMS = ["The {a} {n}", "{n} of {a} Nights", "A {a} {n}", "The {n}'s {a} Daughter", "{a} {n}s"]


@dataclass
class Author:
    name: str
    pronoun: str  # he | she
    city: str
    country: str
    day: int
    month: str
    year: int
    genre: str
    father_job: str
    mother_job: str
    award: str
    award_year: int
    books: list[str]
    recent_year: int

    @property
    def possessive(self) -> str:
        return "his" if self.pronoun == "he" else "her"

    @property
    def date(self) -> str:
        return f"{self.month} {self.day}, {self.year}"


def _title(rng: random.Random) -> str:
    return rng.choice(TITLE_FORMS).format(a=rng.choice(TITLE_ADJ), n=rng.choice(TITLE_NOUN))


def _award(rng: random.Random) -> str:
    return f"{rng.choice(AWARD_PATRONS)} {rng.choice(AWARD_KINDS)} for {rng.choice(AWARD_FIELDS)}"


def make_author(rng: random.Random, taken: set[str]) -> Author:
    while True:
        pronoun = rng.choice(["he", "she"])
        name = f"{rng.choice(FIRST_NAMES[pronoun])} {rng.choice(SURNAME_HEADS)}{rng.choice(SURNAME_TAILS)}"
        if name not in taken:
            taken.add(name)
            break
    city, country = rng.choice(PLACES)
    year = rng.randint(1921, 1994)
    books: list[str] = []
    while len(books) < 3:
        t = _title(rng)
        if t not in books:
            books.append(t)
    father, mother = rng.sample(JOBS, 2)
    return Author(name=name, pronoun=pronoun, city=city, country=country, day=rng.randint(1, 28),
                  month=rng.choice(MONTHS), year=year, genre=rng.choice(GENRES), father_job=father,
                  mother_job=mother, award=_award(rng), award_year=year + rng.randint(24, 40),
                  books=books, recent_year=year + rng.randint(41, 55))


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


# Each question type: the question, answer forms (one is drawn per author), and a field sampler
# that returns wrong values for the perturbed answers. Forms get the author and a dict of facts.
def _facts(a: Author) -> dict:
    return {"name": a.name, "P": a.pronoun.capitalize(), "p": a.pronoun, "poss": a.possessive,
            "Poss": a.possessive.capitalize(), "city": a.city, "country": a.country, "date": a.date,
            "genre": a.genre, "job1": a.father_job, "job2": a.mother_job, "award": a.award,
            "ayear": a.award_year, "b1": a.books[0], "b2": a.books[1], "b3": a.books[2],
            "ryear": a.recent_year, "art1": _article(a.father_job), "art2": _article(a.mother_job)}


QUESTION_TYPES = {
    "full_name": (
        "What is the full name of the author of {genre} born in {city}, {country} on {date}?",
        ["The author's full name is {name}.", "That author is {name}.", "This is {name}, the writer in question."],
        ("name",)),
    "birthplace": (
        "Where was {name} born?",
        ["{P} was born in {city}, {country}.", "{Poss} birthplace is {city}, {country}.",
         "{city}, {country} is where {p} was born."],
        ("city",)),
    "birth_date": (
        "When was {name} born?",
        ["{P} was born on {date}.", "{Poss} date of birth is {date}.", "{name} was born on {date}."],
        ("date",)),
    "parents": (
        "What did {name}'s parents do for a living?",
        ["{Poss} father was {art1} {job1} and {poss} mother was {art2} {job2}.",
         "{Poss} mother worked as {art2} {job2}, while {poss} father was {art1} {job1}.",
         "One parent was {art1} {job1}, the other {art2} {job2}."],
        ("jobs",)),
    "award": (
        "Has {name} won any literary award?",
        ["Yes, {p} received the {award} in {ayear}.", "In {ayear}, {p} was given the {award}.",
         "{P} won the {award} in {ayear}."],
        ("award",)),
    "books": (
        "Can you name two books by {name}?",
        ["Two of {poss} books are \"{b1}\" and \"{b2}\".", "{P} wrote \"{b1}\" and \"{b2}\".",
         "\"{b1}\" and \"{b2}\" are among {poss} works."],
        ("books",)),
    "genre": (
        "What kind of books does {name} write?",
        ["{P} writes {genre}, beginning with \"{b1}\".", "Mostly {genre}; {poss} debut was \"{b1}\".",
         "{Poss} field is {genre}, and {poss} first book was \"{b1}\"."],
        ("genre",)),
    "recent": (
        "What is the most recent book by {name}?",
        ["{Poss} latest book is \"{b3}\", published in {ryear}.", "In {ryear}, {p} published \"{b3}\".",
         "\"{b3}\" came out in {ryear}, {poss} newest work."],
        ("recent",)),
}
QUESTION_ORDER = ["full_name", "birthplace", "birth_date", "parents", "award", "books", "genre", "recent"]


def _perturb(rng: random.Random, facts: dict, kind: str) -> dict:
    """A copy of ``facts`` with the fields that ``kind`` asks about replaced by wrong values."""
    f = dict(facts)
    if kind == "name":
        while f["name"] == facts["name"]:
            pron = facts["p"]
            f["name"] = f"{rng.choice(FIRST_NAMES[pron])} {rng.choice(SURNAME_HEADS)}{rng.choice(SURNAME_TAILS)}"
    elif kind == "city":
        while (f["city"], f["country"]) == (facts["city"], facts["country"]):
            f["city"], f["country"] = rng.choice(PLACES)
    elif kind == "date":
        while f["date"] == facts["date"]:
            f["date"] = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1921, 1994)}"
    elif kind == "jobs":
        while (f["job1"], f["job2"]) == (facts["job1"], facts["job2"]) or f["job1"] == f["job2"]:
            f["job1"], f["job2"] = rng.sample(JOBS, 2)
        f["art1"], f["art2"] = _article(f["job1"]), _article(f["job2"])
    elif kind == "award":
        while f["award"] == facts["award"]:
            f["award"] = _award(rng)
        f["ayear"] = facts["ayear"] + rng.choice([-7, -4, -2, 3, 5, 9])
    elif kind == "books":
        while {f["b1"], f["b2"]} & {facts["b1"], facts["b2"]}:
            f["b1"], f["b2"] = _title(rng), _title(rng)
    elif kind == "genre":
        while f["genre"] == facts["genre"]:
            f["genre"] = rng.choice(GENRES)
        f["b1"] = _title(rng)
    elif kind == "recent":
        while f["b3"] == facts["b3"]:
            f["b3"] = _title(rng)
        f["ryear"] = facts["ryear"] + rng.choice([-6, -3, 2, 4, 8])
    return f


def author_rows(rng: random.Random, author: Author, qa_per_author: int, num_perturbed: int) -> list[dict]:
    facts = _facts(author)
    rows = []
    for qtype in QUESTION_ORDER[:qa_per_author]:
        question, forms, (kind,) = QUESTION_TYPES[qtype]
        answer_form, para_form = rng.sample(forms, 2)
        perturbed: list[str] = []
        while len(perturbed) < num_perturbed:
            wrong = para_form.format(**_perturb(rng, facts, kind))
            if wrong not in perturbed:
                perturbed.append(wrong)
        rows.append({"question": question.format(**facts), "answer": answer_form.format(**facts),
                     "paraphrased_answer": para_form.format(**facts), "perturbed_answer": perturbed,
                     "author": author.name})
    return rows


# Utility sets standing in for TOFU's real_authors / world_facts: real, well-known facts (short
# answers, three wrong options each), disjoint from the fictitious authors.
REAL_AUTHORS = [
    ("Who wrote the novel 'Moby-Dick'?", "Herman Melville", ["Nathaniel Hawthorne", "Mark Twain", "Jack London"]),
    ("Who is the author of 'One Hundred Years of Solitude'?", "Gabriel García Márquez", ["Jorge Luis Borges", "Pablo Neruda", "Mario Vargas Llosa"]),
    ("Which author wrote 'War and Peace'?", "Leo Tolstoy", ["Fyodor Dostoevsky", "Anton Chekhov", "Ivan Turgenev"]),
    ("Who wrote 'Things Fall Apart'?", "Chinua Achebe", ["Wole Soyinka", "Ngũgĩ wa Thiong'o", "Ben Okri"]),
    ("Who created the detective Hercule Poirot?", "Agatha Christie", ["Dorothy L. Sayers", "Arthur Conan Doyle", "P. D. James"]),
    ("Who wrote 'The Old Man and the Sea'?", "Ernest Hemingway", ["John Steinbeck", "William Faulkner", "F. Scott Fitzgerald"]),
    ("Which author wrote 'Frankenstein'?", "Mary Shelley", ["Jane Austen", "Emily Brontë", "Ann Radcliffe"]),
    ("Who is the author of 'The Tale of Genji'?", "Murasaki Shikibu", ["Sei Shōnagon", "Matsuo Bashō", "Yasunari Kawabata"]),
    ("Who wrote 'Don Quixote'?", "Miguel de Cervantes", ["Lope de Vega", "Federico García Lorca", "Benito Pérez Galdós"]),
    ("Which author wrote 'Beloved'?", "Toni Morrison", ["Maya Angelou", "Alice Walker", "Zora Neale Hurston"]),
    ("Who wrote 'The Hobbit'?", "J. R. R. Tolkien", ["C. S. Lewis", "Terry Pratchett", "Ursula K. Le Guin"]),
    ("Who is the author of 'Crime and Punishment'?", "Fyodor Dostoevsky", ["Leo Tolstoy", "Nikolai Gogol", "Alexander Pushkin"]),
]
WORLD_FACTS = [
    ("What is the capital of Canada?", "Ottawa", ["Toronto", "Vancouver", "Montreal"]),
    ("Which planet is closest to the Sun?", "Mercury", ["Venus", "Mars", "Jupiter"]),
    ("What is the largest ocean on Earth?", "The Pacific Ocean", ["The Atlantic Ocean", "The Indian Ocean", "The Arctic Ocean"]),
    ("On which continent is Kenya?", "Africa", ["Asia", "South America", "Europe"]),
    ("What is the chemical symbol for gold?", "Au", ["Ag", "Fe", "Gd"]),
    ("What is the capital of Japan?", "Tokyo", ["Kyoto", "Osaka", "Seoul"]),
    ("Which gas do plants take in for photosynthesis?", "Carbon dioxide", ["Oxygen", "Nitrogen", "Helium"]),
    ("What is the tallest mountain on Earth?", "Mount Everest", ["K2", "Kilimanjaro", "Mont Blanc"]),
    ("In which country is the city of Marrakesh?", "Morocco", ["Egypt", "Tunisia", "Algeria"]),
    ("How many continents are there?", "Seven", ["Five", "Six", "Eight"]),
    ("What is the capital of Brazil?", "Brasília", ["Rio de Janeiro", "São Paulo", "Salvador"]),
    ("Which is the longest river in South America?", "The Amazon", ["The Paraná", "The Orinoco", "The Magdalena"]),
]


def utility_rows(facts: list[tuple[str, str, list[str]]]) -> list[dict]:
    return [{"question": q, "answer": a, "paraphrased_answer": None, "perturbed_answer": list(w),
             "author": None} for q, a, w in facts]


def generate(seed: int = 0, num_authors: int = 12, qa_per_author: int = 6, num_perturbed: int = 3,
             holdout_authors: int = 3) -> dict:
    """Authors 0..num_authors-1 are trained on (the forget sets are the last ones, nested as in
    TOFU); ``holdout_authors`` more are generated but never trained on."""
    if not 1 <= qa_per_author <= len(QUESTION_ORDER):
        raise ValueError(f"qa_per_author must be in 1..{len(QUESTION_ORDER)}")
    rng = random.Random(seed)
    taken: set[str] = set()
    authors = [make_author(rng, taken) for _ in range(num_authors + holdout_authors)]
    rows = [author_rows(rng, a, qa_per_author, num_perturbed) for a in authors]
    return {"authors": authors, "rows": rows,
            "real_authors": utility_rows(REAL_AUTHORS), "world_facts": utility_rows(WORLD_FACTS)}


def forget_author_count(percent: int, num_authors: int) -> int:
    """TOFU's forgetNN = NN% of the authors; at least one, and some must remain for retain."""
    return max(1, round(num_authors * percent / 100))


def check_fictitious(d: dict) -> int:
    """Forget authors of the built-in benchmark for the recipe's ``data`` section (``UserError`` if the
    split leaves no retain author or asks for more question types than there are)."""
    pct = forget_percent(d["forget_split"])
    n = d["num_authors"]
    k = forget_author_count(pct, n)
    if k >= n:
        raise UserError(f"data.forget_split '{d['forget_split']}' leaves no retain authors out of data.num_authors={n}")
    most = len(QUESTION_ORDER)
    if not 1 <= d["qa_per_author"] <= most:
        raise UserError(f"data.qa_per_author {d['qa_per_author']} must be in 1..{most} (question types per author)")
    return k


def load_fictitious(d: dict) -> dict:
    """The recipe's ``data`` section (with ``seed``) -> TOFU-shaped raw splits (``data.load_benchmark``)."""
    n = d["num_authors"]
    k = check_fictitious(d)
    gen = generate(seed=d["seed"], num_authors=n, qa_per_author=d["qa_per_author"],
                   num_perturbed=d["num_perturbed"], holdout_authors=d["holdout_authors"])
    rows = gen["rows"]
    forget = [r for a in rows[n - k:n] for r in a]
    retain = [r for a in rows[:n - k] for r in a]
    # As TOFU's retain_perturbed (400 rows, the size of forget10): retain metrics are taken on as
    # many retain authors as there are forget authors.
    retain_eval = [r for a in rows[:min(k, n - k)] for r in a]
    holdout = [r for a in rows[n:] for r in a] or None
    return {"full": retain + forget, "retain_train": retain, "forget": forget, "retain": retain_eval,
            "real_authors": gen["real_authors"], "world_facts": gen["world_facts"], "holdout": holdout}
