"""Citizen one-line commands: strict, so a letter is never mistaken for a command."""
from mailflow.core.commands import parse_command


def test_commands_alone_or_above_a_quote() -> None:
    assert parse_command("successful") == "successful"
    assert parse_command("  Partially successful.\n") == "partially_successful"
    assert parse_command("Refused!\n\nOn Mon, 1 Dec 2026, X <reply-1-abc@x> wrote:\n> text") == "rejected"
    assert parse_command("not held\n-- \nJane") == "not_held"
    assert parse_command("INTERNAL REVIEW") == "internal_review"


def test_letters_are_not_commands() -> None:
    assert parse_command("Refused. I want to appeal because they are wrong.\nThanks") is None
    assert parse_command("Thank you, that was successful\nand quick.") is None
    assert parse_command("Could you also break that down by ward?") is None
    assert parse_command("") is None
