"""Generated documentation stays in step with the code."""

from pathlib import Path

from agent.policy.rules import RULES, rules_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_rules_doc_is_generated_from_the_rule_table():
    assert (ROOT / "docs" / "rules.md").read_text() == rules_markdown(), "run `make docs`"


def test_every_rule_of_the_spec_is_implemented_once():
    assert [r.id for r in RULES] == [f"XS{n:03d}" for n in range(1, 21)]
