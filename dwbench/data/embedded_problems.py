"""The embedded task's problems: GSM8K-style word problems drawn from templates.

Each template draws its numbers from a seeded RNG and returns the question with a solver that
writes the worked answer through a `_Calculator`, so embedded_answers.py can replay the same solver
with one step broken. Difficulties, so the task can be made learnable by a small model:
- one_step: one operation on numbers up to about 40 (a single annotated sentence).
- two_step: two operations on small numbers.
- multi_step: 3-4 steps with two- and three-digit numbers (the original problems, unchanged).
"""

from __future__ import annotations

import random
from collections.abc import Callable

_PEOPLE = (
    ("Maria", "she", "her"),
    ("James", "he", "his"),
    ("Aisha", "she", "her"),
    ("Tom", "he", "his"),
    ("Priya", "she", "her"),
    ("Diego", "he", "his"),
    ("Hannah", "she", "her"),
    ("Kenji", "he", "his"),
    ("Lena", "she", "her"),
    ("Omar", "he", "his"),
    ("Sofia", "she", "her"),
    ("Liam", "he", "his"),
)


class _Calculator:
    """Does one answer's arithmetic and writes each step as GSM8K does: `3 * 4 = <<3*4=12>>12`.

    With `break_at`, that step's result is off by `delta` and later steps compute from the wrong
    value. `valid` turns false when a broken value makes a division inexact or a result
    non-positive, which a generated answer must never show.
    """

    def __init__(self, break_at: int | None = None, delta: int = 0) -> None:
        self.break_at = break_at
        self.delta = delta
        self.results: list[int] = []
        self.valid = True

    def __call__(self, a: int, op: str, b: int) -> tuple[str, int]:
        if op == "+":
            result = a + b
        elif op == "-":
            result = a - b
        elif op == "*":
            result = a * b
        else:  # "/": every divisor is a drawn parameter, never a computed value, so never zero
            self.valid = self.valid and a % b == 0
            result = a // b
        if len(self.results) == self.break_at:
            result += self.delta
        self.valid = self.valid and result > 0
        self.results.append(result)
        return f"{a} {op} {b} = <<{a}{op}{b}={result}>>{result}", result


Solver = Callable[[_Calculator], list[str]]
Problem = tuple[str, Solver]


def _person(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(_PEOPLE)


def _shopping(rng: random.Random) -> Problem:
    name, she, her = _person(rng)
    item1, item2 = rng.sample(["notebooks", "pens", "folders", "markers", "erasers", "rulers"], 2)
    n1, p1 = rng.randint(2, 8), rng.randint(2, 9)
    n2, p2 = rng.randint(2, 8), rng.randint(1, 6)
    bill = next(b for b in (20, 50, 100, 200) if b > n1 * p1 + n2 * p2)
    question = (
        f"{name} buys {n1} {item1} for ${p1} each and {n2} {item2} for ${p2} each. "
        f"{she.capitalize()} pays with a ${bill} bill. How much change does {she} get?"
    )

    def solve(calc: _Calculator) -> list[str]:
        s1, c1 = calc(n1, "*", p1)
        s2, c2 = calc(n2, "*", p2)
        s3, total = calc(c1, "+", c2)
        s4, _ = calc(bill, "-", total)
        return [
            f"The {item1} cost {s1} dollars.",
            f"The {item2} cost {s2} dollars.",
            f"Altogether {she} spends {s3} dollars.",
            f"So {her} change is {s4} dollars.",
        ]

    return question, solve


def _road_trip(rng: random.Random) -> Problem:
    name, she, her = _person(rng)
    s1, s2 = rng.randrange(30, 70, 5), rng.randrange(30, 70, 5)
    h1, h2 = rng.randint(2, 5), rng.randint(2, 5)
    question = (
        f"{name} drives at {s1} miles per hour for {h1} hours, stops for lunch, and then drives "
        f"at {s2} miles per hour for {h2} more hours. How many miles does {she} drive in total?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, d1 = calc(s1, "*", h1)
        t2, d2 = calc(s2, "*", h2)
        t3, _ = calc(d1, "+", d2)
        return [
            f"Before lunch {she} drives {t1} miles.",
            f"After lunch {she} drives {t2} miles.",
            f"So {her} whole trip is {t3} miles.",
        ]

    return question, solve


def _sharing(rng: random.Random) -> Problem:
    name, she, her = _person(rng)
    trays, per_tray, friends = rng.randint(2, 5), rng.randint(6, 12), rng.randint(3, 8)
    rest = (trays * per_tray) % friends
    kept = rng.choice([e for e in range(rest, trays * per_tray, friends)[:3] if e > 0])
    question = (
        f"{name} bakes {trays} trays of cookies with {per_tray} cookies on each tray. "
        f"{she.capitalize()} keeps {kept} cookies for {her} family and shares the rest equally "
        f"among {friends} friends. How many cookies does each friend get?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, baked = calc(trays, "*", per_tray)
        t2, shared = calc(baked, "-", kept)
        t3, _ = calc(shared, "/", friends)
        return [
            f"{name} bakes {t1} cookies.",
            f"After keeping some, {she} has {t2} cookies to share.",
            f"Each friend gets {t3} cookies.",
        ]

    return question, solve


def _savings(rng: random.Random) -> Problem:
    name, she, _ = _person(rng)
    thing = rng.choice(["bike", "guitar", "tablet", "skateboard", "telescope", "camera"])
    has, weekly, weeks = rng.randint(10, 60), rng.randint(5, 20), rng.randint(3, 10)
    price = has + weekly * weeks + rng.randint(5, 60)
    question = (
        f"{name} wants to buy a {thing} that costs ${price}. {she.capitalize()} already has "
        f"${has} and saves ${weekly} every week for {weeks} weeks. How much more money does "
        f"{she} need to buy the {thing}?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, saved = calc(weekly, "*", weeks)
        t2, total = calc(saved, "+", has)
        t3, _ = calc(price, "-", total)
        return [
            f"In {weeks} weeks {she} saves {t1} dollars.",
            f"Then {she} has {t2} dollars.",
            f"{she.capitalize()} still needs {t3} dollars.",
        ]

    return question, solve


def _bakery(rng: random.Random) -> Problem:
    goods = rng.choice(["muffins", "bagels", "cupcakes", "rolls"])
    box = rng.choice([4, 6])
    batches, per_batch, days = rng.randint(2, 6), box * rng.randint(2, 4), rng.randint(2, 7)
    question = (
        f"A bakery makes {batches} batches of {goods} every day, with {per_batch} {goods} in "
        f"each batch. It packs the {goods} in boxes of {box}. How many boxes does it fill in "
        f"{days} days?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, daily = calc(batches, "*", per_batch)
        t2, made = calc(daily, "*", days)
        t3, _ = calc(made, "/", box)
        return [
            f"Each day the bakery makes {t1} {goods}.",
            f"In {days} days it makes {t2} {goods}.",
            f"That fills {t3} boxes.",
        ]

    return question, solve


def _garden(rng: random.Random) -> Problem:
    name, she, her = _person(rng)
    plant, fruit = rng.choice(
        [("tomato", "tomatoes"), ("pepper", "peppers"), ("strawberry", "strawberries")]
    )
    rows, per_row, each = rng.randint(2, 6), rng.randint(3, 8), rng.randint(2, 9)
    given = rng.randint(5, rows * per_row * each // 2)
    question = (
        f"{name} plants {rows} rows of {plant} plants with {per_row} plants in each row. Each "
        f"plant grows {each} {fruit}. {she.capitalize()} gives {given} {fruit} to {her} "
        f"neighbours. How many {fruit} does {she} have left?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, plants = calc(rows, "*", per_row)
        t2, grown = calc(plants, "*", each)
        t3, _ = calc(grown, "-", given)
        return [
            f"{name} has {t1} plants.",
            f"They grow {t2} {fruit}.",
            f"After giving some away, {she} has {t3} {fruit} left.",
        ]

    return question, solve


def _wages(rng: random.Random) -> Problem:
    name, she, her = _person(rng)
    place = rng.choice(["bookstore", "cafe", "library", "garden centre", "cinema"])
    wage, hours, days = rng.randint(10, 25), rng.randint(3, 8), rng.randint(2, 6)
    spent = rng.randint(20, wage * hours * days // 2)
    question = (
        f"{name} earns ${wage} an hour at the {place}. This week {she} works {hours} hours a day "
        f"for {days} days and spends ${spent} of {her} pay on groceries. How much of this week's "
        f"pay does {she} have left?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, daily = calc(wage, "*", hours)
        t2, pay = calc(daily, "*", days)
        t3, _ = calc(pay, "-", spent)
        return [
            f"Each day {she} earns {t1} dollars.",
            f"This week {she} earns {t2} dollars.",
            f"After groceries {she} has {t3} dollars left.",
        ]

    return question, solve


def _reading(rng: random.Random) -> Problem:
    name, she, _ = _person(rng)
    first, days, later = rng.randint(10, 30), rng.randint(2, 7), rng.randrange(10, 45, 5)
    pages = first * days + later * rng.randint(2, 8)
    question = (
        f"{name} is reading a {pages}-page book. {she.capitalize()} reads {first} pages a day for "
        f"{days} days, and after that {she} reads {later} pages a day. How many more days does "
        f"{she} need to finish the book?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, read = calc(first, "*", days)
        t2, left = calc(pages, "-", read)
        t3, _ = calc(left, "/", later)
        return [
            f"In the first {days} days {she} reads {t1} pages.",
            f"That leaves {t2} pages.",
            f"At {later} pages a day {she} needs {t3} more days.",
        ]

    return question, solve


def _fuel(rng: random.Random) -> Problem:
    name, she, her = _person(rng)
    place = rng.choice(["grandmother's house", "cousin's farm", "friend's cabin", "old school"])
    mpg, price = rng.choice([20, 25, 30, 40]), rng.randint(3, 5)
    miles = mpg * rng.randint(1, 6)
    question = (
        f"{name} drives to {her} {place}, which is {miles} miles away, and back again. "
        f"{her.capitalize()} car goes {mpg} miles on one gallon of gas, and gas costs ${price} a "
        f"gallon. How much does {she} spend on gas for the round trip?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, total = calc(miles, "*", 2)
        t2, gallons = calc(total, "/", mpg)
        t3, _ = calc(gallons, "*", price)
        return [
            f"The round trip is {t1} miles.",
            f"The car uses {t2} gallons.",
            f"The gas costs {t3} dollars.",
        ]

    return question, solve


def _field_trip(rng: random.Random) -> Problem:
    place = rng.choice(["zoo", "science museum", "aquarium", "planetarium"])
    students, teachers = rng.randint(20, 40), rng.randint(2, 5)
    student_price = rng.randint(4, 12)
    teacher_price = student_price + rng.randint(2, 8)
    bus = rng.randrange(80, 210, 10)
    question = (
        f"A school takes {students} students and {teachers} teachers to the {place}. Student "
        f"tickets cost ${student_price} and teacher tickets cost ${teacher_price}. The school also "
        f"pays ${bus} for the bus. How much does the trip cost in total?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, s = calc(students, "*", student_price)
        t2, t = calc(teachers, "*", teacher_price)
        t3, tickets = calc(s, "+", t)
        t4, _ = calc(tickets, "+", bus)
        return [
            f"Student tickets cost {t1} dollars.",
            f"Teacher tickets cost {t2} dollars.",
            f"All the tickets cost {t3} dollars.",
            f"With the bus, the trip costs {t4} dollars.",
        ]

    return question, solve


def _fruit_bowl(rng: random.Random) -> Problem:
    name, she, _ = _person(rng)
    first, second, third = rng.sample(["apples", "oranges", "bananas", "pears", "plums"], 3)
    times, word = rng.choice([(2, "twice"), (3, "three times")])
    count, fewer = rng.randint(3, 12), rng.randint(1, 5)
    question = (
        f"{name} has {count} {first}. {she.capitalize()} has {word} as many {second} as {first} "
        f"and {fewer} fewer {third} than {second}. How many pieces of fruit does {she} have?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, n2 = calc(count, "*", times)
        t2, n3 = calc(n2, "-", fewer)
        t3, both = calc(count, "+", n2)
        t4, _ = calc(both, "+", n3)
        return [
            f"{name} has {t1} {second}.",
            f"{she.capitalize()} has {t2} {third}.",
            f"The {first} and {second} make {t3} pieces.",
            f"Adding the {third} gives {t4} pieces of fruit.",
        ]

    return question, solve


def _gift(rng: random.Random) -> Problem:
    name, she, her = _person(rng)
    things = rng.choice(["marbles", "stickers", "shells", "stamps", "cards", "beads"])
    have, given = rng.randint(3, 25), rng.randint(2, 15)
    question = (
        f"{name} has {have} {things}. {her.capitalize()} friend gives {her} {given} more "
        f"{things}. How many {things} does {she} have now?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, _ = calc(have, "+", given)
        return [f"{name} has {t1} {things} now."]

    return question, solve


def _birthday(rng: random.Random) -> Problem:
    name, _, her = _person(rng)
    relative = rng.choice(["cousin", "aunt", "uncle", "neighbour", "teacher"])
    age, older = rng.randint(5, 15), rng.randint(2, 25)
    question = (
        f"{name} is {age} years old. {her.capitalize()} {relative} is {older} years older. "
        f"How old is {her} {relative}?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, _ = calc(age, "+", older)
        return [f"{her.capitalize()} {relative} is {t1} years old."]

    return question, solve


def _giving_away(rng: random.Random) -> Problem:
    name, she, her = _person(rng)
    things = rng.choice(["pencils", "balloons", "crayons", "candies", "toy cars", "buttons"])
    relative = rng.choice(["brother", "sister", "cousin", "friend"])
    have = rng.randint(10, 40)
    given = rng.randint(1, have - 1)
    question = (
        f"{name} has {have} {things} and gives {given} of them to {her} {relative}. "
        f"How many {things} does {she} have left?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, _ = calc(have, "-", given)
        return [f"{name} has {t1} {things} left."]

    return question, solve


def _bus_stop(rng: random.Random) -> Problem:
    name, she, _ = _person(rng)
    riders = rng.randint(10, 40)
    off = rng.randint(1, riders - 1)
    question = (
        f"{name} counts {riders} people on a bus. At the next stop {off} of them get off. "
        f"How many of the people {she} counted are still on the bus?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, _ = calc(riders, "-", off)
        return [f"So {t1} of them are still on the bus."]

    return question, solve


def _packs(rng: random.Random) -> Problem:
    name, she, _ = _person(rng)
    things = rng.choice(["pens", "batteries", "socks", "juice boxes", "yogurts", "tennis balls"])
    packs, each = rng.randint(2, 6), rng.randint(2, 8)
    question = (
        f"{name} buys {packs} packs of {things} with {each} {things} in each pack. "
        f"How many {things} does {she} buy?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, _ = calc(packs, "*", each)
        return [f"{name} buys {t1} {things}."]

    return question, solve


def _price(rng: random.Random) -> Problem:
    name, she, _ = _person(rng)
    thing, things = rng.choice(
        [("ticket", "tickets"), ("sandwich", "sandwiches"), ("book", "books"), ("kite", "kites")]
    )
    price, count = rng.randint(2, 9), rng.randint(2, 5)
    question = f"One {thing} costs ${price}. {name} buys {count} {things}. How much does {she} pay?"

    def solve(calc: _Calculator) -> list[str]:
        t1, _ = calc(count, "*", price)
        return [f"{name} pays {t1} dollars."]

    return question, solve


def _fair_share(rng: random.Random) -> Problem:
    name, _, _ = _person(rng)
    things = rng.choice(["apples", "cookies", "grapes", "strawberries", "crackers", "nuts"])
    friends, each = rng.randint(2, 5), rng.randint(2, 8)
    total = friends * each
    question = (
        f"{name} shares {total} {things} equally among {friends} friends. "
        f"How many {things} does each friend get?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, _ = calc(total, "/", friends)
        return [f"Each friend gets {t1} {things}."]

    return question, solve


def _teams(rng: random.Random) -> Problem:
    name, _, _ = _person(rng)
    size, teams = rng.randint(2, 6), rng.randint(2, 6)
    children = size * teams
    question = (
        f"{name}'s coach splits {children} children into teams of {size}. How many teams are there?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, _ = calc(children, "/", size)
        return [f"There are {t1} teams."]

    return question, solve


def _pocket_money(rng: random.Random) -> Problem:
    name, she, her = _person(rng)
    relative = rng.choice(["grandmother", "grandfather", "aunt", "uncle"])
    thing = rng.choice(["book", "puzzle", "comic", "yo-yo", "water bottle"])
    has, gift = rng.randint(5, 20), rng.randint(2, 15)
    spent = rng.randint(1, has + gift - 1)
    question = (
        f"{name} has ${has}. {her.capitalize()} {relative} gives {her} ${gift}, and then {she} "
        f"spends ${spent} on a {thing}. How much money does {she} have now?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, total = calc(has, "+", gift)
        t2, _ = calc(total, "-", spent)
        return [
            f"After the gift {she} has {t1} dollars.",
            f"After buying the {thing} {she} has {t2} dollars.",
        ]

    return question, solve


def _small_change(rng: random.Random) -> Problem:
    name, she, _ = _person(rng)
    things = rng.choice(["apples", "pencils", "cupcakes", "postcards", "bottles of water"])
    count, price = rng.randint(2, 5), rng.randint(2, 8)
    bill = next(b for b in (10, 20, 50) if b > count * price)
    question = (
        f"{name} buys {count} {things} for ${price} each and pays with a ${bill} bill. "
        f"How much change does {she} get?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, cost = calc(count, "*", price)
        t2, _ = calc(bill, "-", cost)
        return [f"The {things} cost {t1} dollars.", f"{name} gets {t2} dollars in change."]

    return question, solve


def _snack_boxes(rng: random.Random) -> Problem:
    name, she, _ = _person(rng)
    things = rng.choice(["crackers", "granola bars", "rice cakes", "cookies", "pretzels"])
    boxes, each = rng.randint(2, 5), rng.randint(3, 8)
    eaten = rng.randint(1, min(10, boxes * each - 1))
    question = (
        f"{name} has {boxes} boxes of {things} with {each} {things} in each box. "
        f"{she.capitalize()} eats {eaten} of them. How many {things} are left?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, total = calc(boxes, "*", each)
        t2, _ = calc(total, "-", eaten)
        return [f"{name} has {t1} {things}.", f"After eating some, {t2} {things} are left."]

    return question, solve


def _party_bags(rng: random.Random) -> Problem:
    name, she, _ = _person(rng)
    first, second = rng.sample(["red", "blue", "green", "yellow", "purple"], 2)
    bags, each = rng.randint(2, 5), rng.randint(2, 8)
    total = bags * each
    a = rng.randint(1, total - 1)
    question = (
        f"{name} has {a} {first} balloons and {total - a} {second} balloons. {she.capitalize()} "
        f"puts them into {bags} party bags with the same number in each bag. How many balloons "
        f"go in each bag?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, balloons = calc(a, "+", total - a)
        t2, _ = calc(balloons, "/", bags)
        return [f"{name} has {t1} balloons.", f"Each bag gets {t2} balloons."]

    return question, solve


def _pages_left(rng: random.Random) -> Problem:
    name, she, _ = _person(rng)
    per_day, days = rng.randint(2, 9), rng.randint(2, 5)
    pages = per_day * days + rng.randint(1, 30)
    question = (
        f"{name}'s book has {pages} pages. {she.capitalize()} reads {per_day} pages a day for "
        f"{days} days. How many pages does {she} have left to read?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, read = calc(per_day, "*", days)
        t2, _ = calc(pages, "-", read)
        return [f"{she.capitalize()} reads {t1} pages.", f"So {she} has {t2} pages left to read."]

    return question, solve


def _two_colours(rng: random.Random) -> Problem:
    name, she, _ = _person(rng)
    first, second = rng.sample(["red", "blue", "green", "yellow", "white"], 2)
    things = rng.choice(["flowers", "ribbons", "flags", "candles"])
    a, b, price = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 4)
    question = (
        f"{name} buys {a} {first} {things} and {b} {second} {things}. Each one costs ${price}. "
        f"How much does {she} spend?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, count = calc(a, "+", b)
        t2, _ = calc(count, "*", price)
        return [f"{name} buys {t1} {things}.", f"{she.capitalize()} spends {t2} dollars."]

    return question, solve


def _piggy_bank(rng: random.Random) -> Problem:
    name, she, _ = _person(rng)
    has, weekly, weeks = rng.randint(3, 20), rng.randint(2, 8), rng.randint(2, 5)
    question = (
        f"{name} has ${has} in a piggy bank and saves ${weekly} every week for {weeks} weeks. "
        f"How much money does {she} have then?"
    )

    def solve(calc: _Calculator) -> list[str]:
        t1, saved = calc(weekly, "*", weeks)
        t2, _ = calc(saved, "+", has)
        return [f"{she.capitalize()} saves {t1} dollars.", f"Then {she} has {t2} dollars."]

    return question, solve


# Keyed by task.generator.difficulty; multi_step's order is fixed (it decides the seeded draws).
_TEMPLATES: dict[str, tuple[Callable[[random.Random], Problem], ...]] = {
    "one_step": (_gift, _birthday, _giving_away, _bus_stop, _packs, _price, _fair_share, _teams),
    "two_step": (
        _pocket_money,
        _small_change,
        _snack_boxes,
        _party_bags,
        _pages_left,
        _two_colours,
        _piggy_bank,
    ),
    "multi_step": (
        _shopping,
        _road_trip,
        _sharing,
        _savings,
        _bakery,
        _garden,
        _wages,
        _reading,
        _fuel,
        _field_trip,
        _fruit_bowl,
    ),
}
DIFFICULTIES = tuple(_TEMPLATES)
