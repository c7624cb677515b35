"""Figures a test wants a person to see at the end of the run (pytest captures what tests print);
conftest.py writes them in the terminal summary."""

SUMMARY: list[str] = []
