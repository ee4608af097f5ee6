"""arith: our own synthetic GSM-style word problems, generated offline for CPU demos and tests.

Each row is a {'question', 'answer'} dict in gsm8k's format (worked steps with `<<a*b=c>>`
calculator annotations, then "#### N"), so the task renders exactly as gsm8k. Ten question
templates draw their names, goods and numbers from a `random.Random` seeded by (seed, row index):
a row depends only on those two, so the stream can be read to any length and every split is
reproducible. Without a limit a split is drawn from the first `ARITH_DEFAULT_ROWS` rows.
"""

from __future__ import annotations

import random

ARITH_DEFAULT_ROWS = 2000

_PEOPLE = (
    ("Maya", "she"),
    ("Liam", "he"),
    ("Aisha", "she"),
    ("Carlos", "he"),
    ("Noah", "he"),
    ("Priya", "she"),
    ("Tom", "he"),
    ("Elena", "she"),
    ("Kenji", "he"),
    ("Zoe", "she"),
    ("Omar", "he"),
    ("Grace", "she"),
    ("Mateo", "he"),
    ("Hana", "she"),
    ("Ivan", "he"),
)
_GOODS = ("notebooks", "apples", "pens", "muffins", "tickets", "candles", "comic books", "plants")
_BIG_GOODS = ("jacket", "bicycle", "lamp", "backpack", "guitar", "tent", "chair", "watch")
_SHAREABLES = ("stickers", "marbles", "cookies", "cards", "stamps", "shells", "beads")
_VEHICLES = ("train", "cyclist", "truck", "boat", "car", "bus")
_CROPS = ("tomatoes", "carrots", "sunflowers", "peppers", "beans", "roses")


def _person(rng: random.Random, avoid: str = "") -> tuple[str, str, str]:
    """(name, pronoun, reflexive) of someone not named `avoid`."""
    name, pronoun = rng.choice([person for person in _PEOPLE if person[0] != avoid])
    return name, pronoun, "herself" if pronoun == "she" else "himself"


def _arith_change(rng: random.Random) -> tuple[str, str]:
    name, pronoun, _ = _person(rng)
    count, price, goods = rng.randint(2, 9), rng.randint(2, 15), rng.choice(_GOODS)
    cost = count * price
    bill = next(bill for bill in (20, 50, 100, 200) if bill > cost)
    change = bill - cost
    question = (
        f"{name} buys {count} {goods} at ${price} each and pays with a ${bill} bill. "
        f"How much change does {pronoun} get?"
    )
    answer = (
        f"The {goods} cost {count} x ${price} = $<<{count}*{price}={cost}>>{cost}.\n"
        f"{name} gets ${bill} - ${cost} = $<<{bill}-{cost}={change}>>{change} in change.\n"
        f"#### {change}"
    )
    return question, answer


def _arith_shopping_total(rng: random.Random) -> tuple[str, str]:
    name, pronoun, _ = _person(rng)
    goods_a, goods_b = rng.sample(_GOODS, 2)
    count_a, price_a = rng.randint(2, 8), rng.randint(1, 12)
    count_b, price_b = rng.randint(2, 8), rng.randint(1, 12)
    cost_a, cost_b = count_a * price_a, count_b * price_b
    total = cost_a + cost_b
    question = (
        f"{name} buys {count_a} {goods_a} for ${price_a} each and {count_b} {goods_b} for "
        f"${price_b} each. How much does {pronoun} spend in total?"
    )
    answer = (
        f"The {goods_a} cost {count_a} x {price_a} = $<<{count_a}*{price_a}={cost_a}>>{cost_a}.\n"
        f"The {goods_b} cost {count_b} x {price_b} = $<<{count_b}*{price_b}={cost_b}>>{cost_b}.\n"
        f"{name} spends {cost_a} + {cost_b} = $<<{cost_a}+{cost_b}={total}>>{total}.\n"
        f"#### {total}"
    )
    return question, answer


def _arith_distance(rng: random.Random) -> tuple[str, str]:
    vehicle = rng.choice(_VEHICLES)
    speed_a, hours_a = rng.randint(8, 70), rng.randint(1, 5)
    speed_b, hours_b = rng.randint(8, 70), rng.randint(1, 4)
    dist_a, dist_b = speed_a * hours_a, speed_b * hours_b
    total = dist_a + dist_b
    question = (
        f"A {vehicle} travels at {speed_a} miles per hour for {hours_a} hours and then at "
        f"{speed_b} miles per hour for {hours_b} hours. How many miles does it travel in total?"
    )
    answer = (
        f"First it goes {speed_a} x {hours_a} = <<{speed_a}*{hours_a}={dist_a}>>{dist_a} miles.\n"
        f"Then it goes {speed_b} x {hours_b} = <<{speed_b}*{hours_b}={dist_b}>>{dist_b} miles.\n"
        f"In total it travels {dist_a} + {dist_b} = <<{dist_a}+{dist_b}={total}>>{total} miles.\n"
        f"#### {total}"
    )
    return question, answer


def _arith_trip_time(rng: random.Random) -> tuple[str, str]:
    name, pronoun, _ = _person(rng)
    speed, hours, pause = 5 * rng.randint(4, 14), rng.randint(2, 9), 5 * rng.randint(1, 9)
    distance, driving = speed * hours, hours * 60
    total = driving + pause
    question = (
        f"{name} has to drive {distance} miles at {speed} miles per hour. "
        f"{pronoun.capitalize()} also stops for a {pause}-minute break. "
        f"How many minutes does the trip take?"
    )
    answer = (
        f"Driving takes {distance} / {speed} = <<{distance}/{speed}={hours}>>{hours} hours.\n"
        f"That is {hours} x 60 = <<{hours}*60={driving}>>{driving} minutes.\n"
        f"With the break it takes {driving} + {pause} = <<{driving}+{pause}={total}>>{total} "
        f"minutes.\n"
        f"#### {total}"
    )
    return question, answer


def _arith_sharing(rng: random.Random) -> tuple[str, str]:
    name, pronoun, reflexive = _person(rng)
    friends, each, kept = rng.randint(2, 8), rng.randint(2, 15), rng.randint(1, 12)
    things = rng.choice(_SHAREABLES)
    rest = friends * each
    total = rest + kept
    question = (
        f"{name} has {total} {things}. {pronoun.capitalize()} keeps {kept} for {reflexive} and "
        f"shares the rest equally among {friends} friends. How many {things} does each friend get?"
    )
    answer = (
        f"{name} shares {total} - {kept} = <<{total}-{kept}={rest}>>{rest} {things}.\n"
        f"Each friend gets {rest} / {friends} = <<{rest}/{friends}={each}>>{each} {things}.\n"
        f"#### {each}"
    )
    return question, answer


def _arith_ages(rng: random.Random) -> tuple[str, str]:
    younger = _person(rng)[0]
    older = _person(rng, avoid=younger)[0]
    age, gap, years = rng.randint(5, 40), rng.randint(2, 30), rng.randint(1, 15)
    older_age = age + gap
    younger_later, older_later = age + years, older_age + years
    total = younger_later + older_later
    question = (
        f"{younger} is {age} years old. {older} is {gap} years older than {younger}. "
        f"What will be the sum of their ages in {years} years?"
    )
    answer = (
        f"{older} is {age} + {gap} = <<{age}+{gap}={older_age}>>{older_age} years old.\n"
        f"In {years} years {younger} will be {age} + {years} = "
        f"<<{age}+{years}={younger_later}>>{younger_later} and {older} will be {older_age} + "
        f"{years} = <<{older_age}+{years}={older_later}>>{older_later}.\n"
        f"Together that is {younger_later} + {older_later} = "
        f"<<{younger_later}+{older_later}={total}>>{total}.\n"
        f"#### {total}"
    )
    return question, answer


def _arith_wages(rng: random.Random) -> tuple[str, str]:
    name, pronoun, _ = _person(rng)
    wage, hours, days = rng.randint(8, 30), rng.randint(2, 9), rng.randint(2, 7)
    daily = wage * hours
    total = daily * days
    question = (
        f"{name} earns ${wage} an hour. {pronoun.capitalize()} works {hours} hours a day for "
        f"{days} days. How much does {pronoun} earn?"
    )
    answer = (
        f"Each day {pronoun} earns {wage} x {hours} = $<<{wage}*{hours}={daily}>>{daily}.\n"
        f"In {days} days {pronoun} earns {daily} x {days} = $<<{daily}*{days}={total}>>{total}.\n"
        f"#### {total}"
    )
    return question, answer


def _arith_discount(rng: random.Random) -> tuple[str, str]:
    name, pronoun, _ = _person(rng)
    item = rng.choice(_BIG_GOODS)
    # a price in 20s and a percent in 5s make the discount a whole number
    price = 20 * rng.randint(1, 60)
    percent = rng.choice((5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 60, 75))
    discount = price * percent // 100
    sale = price - discount
    question = (
        f"{name} wants a {item} that costs ${price}. During a sale it is {percent}% off. "
        f"How much does {pronoun} pay for the {item} during the sale?"
    )
    answer = (
        f"The discount is {price} x {percent} / 100 = "
        f"$<<{price}*{percent}/100={discount}>>{discount}.\n"
        f"{name} pays {price} - {discount} = $<<{price}-{discount}={sale}>>{sale}.\n"
        f"#### {sale}"
    )
    return question, answer


def _arith_reading(rng: random.Random) -> tuple[str, str]:
    name, pronoun, _ = _person(rng)
    per_day, days, left = rng.randint(5, 40), rng.randint(2, 9), rng.randint(3, 120)
    read = per_day * days
    total = read + left
    question = (
        f"{name} is reading a book with {total} pages. {pronoun.capitalize()} reads {per_day} "
        f"pages every day. How many pages are left after {days} days?"
    )
    answer = (
        f"In {days} days {pronoun} reads {per_day} x {days} = "
        f"<<{per_day}*{days}={read}>>{read} pages.\n"
        f"There are {total} - {read} = <<{total}-{read}={left}>>{left} pages left.\n"
        f"#### {left}"
    )
    return question, answer


def _arith_garden(rng: random.Random) -> tuple[str, str]:
    crop = rng.choice(_CROPS)
    rows, per_row = rng.randint(3, 12), rng.randint(4, 15)
    planted = rows * per_row
    lost = rng.randint(1, planted // 3)
    left = planted - lost
    question = (
        f"A farmer plants {rows} rows of {crop} with {per_row} plants in each row. "
        f"{lost} of the plants do not survive. How many plants are left?"
    )
    answer = (
        f"The farmer plants {rows} x {per_row} = <<{rows}*{per_row}={planted}>>{planted} plants.\n"
        f"There are {planted} - {lost} = <<{planted}-{lost}={left}>>{left} plants left.\n"
        f"#### {left}"
    )
    return question, answer


_ARITH_TEMPLATES = (
    _arith_change,
    _arith_shopping_total,
    _arith_distance,
    _arith_trip_time,
    _arith_sharing,
    _arith_ages,
    _arith_wages,
    _arith_discount,
    _arith_reading,
    _arith_garden,
)


def arith_row(row_index: int, seed: int = 0) -> dict[str, str]:
    """Row `row_index` of the synthetic arith task: {'question', 'answer'} in gsm8k's format.

    A row depends only on (row_index, seed), so the stream can be read to any length.
    """
    rng = random.Random(f"adaspec-arith:{seed}:{row_index}")
    question, answer = rng.choice(_ARITH_TEMPLATES)(rng)
    return {"question": question, "answer": answer}
