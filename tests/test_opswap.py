"""OpSwap (paper App. D): the four examples of Table 10, exactly, and properties of the generator."""

import random
from fractions import Fraction

import pytest

from common import load_conversations
from paper_data import final_answer, opswap_chain, opswap_example, parse_opswap

TABLE_10 = {
    0: "(4 + 2) × (4 ÷ 2) - 2 = 6 × (4 ÷ 2) - 2 = 6 × 2 - 2 = 12 - 2 = 10",
    1: "(4 + 2) × (4 ÷ 2) - 2 = 8 × (4 ÷ 2) - 2 = 8 × 2 - 2 = 10 - 2 = 8",
    2: "(4 + 2) × (4 ÷ 2) - 2 = 8 × (4 ÷ 2) - 2 = 8 × 2 - 2 = 8 × 1 = 9",
    3: "(4 + 2) × (4 ÷ 2) - 2 = 2 × (4 ÷ 2) - 2 = 2 × 6 - 2 = 1/3 - 2 = 2/3",
}


@pytest.mark.parametrize("tier", [0, 1, 2, 3])
def test_table_10(tier):
    items, ops = parse_opswap("(4 + 2) × (4 ÷ 2) - 2")
    assert " = ".join(opswap_chain(items, ops, tier)) == TABLE_10[tier]


def test_precedence_follows_meaning():
    items, ops = parse_opswap("1 + 2 × 3")
    assert opswap_chain(items, ops, 0)[-1] == "7"  # standard: × first
    assert opswap_chain(items, ops, 1)[-1] == "5"  # + means ×, × means +: (1×2)+3


@pytest.mark.parametrize("tier", [0, 1, 2, 3])
def test_generator_chains_are_consistent(tier):
    rng = random.Random(tier)
    for _ in range(200):
        user, assistant = opswap_example(rng, tier)
        expr = user["content"].removeprefix("Simplify step by step: ")
        steps = assistant["content"].split(" = ")
        assert steps[0] == expr
        assert 2 <= len(steps) <= 4  # 1 to 3 operations, one per step
        items, ops = parse_opswap(expr)
        assert opswap_chain(items, ops, tier) == steps  # the answer is exactly the chain of steps
        Fraction(final_answer(assistant["content"]))  # the final answer is a number


def test_dataset_is_deterministic_and_sized():
    a = load_conversations("opswap:2")
    b = load_conversations("opswap:2")
    assert len(a) == 10_000 and a == b
    assert a != load_conversations("opswap:1")
