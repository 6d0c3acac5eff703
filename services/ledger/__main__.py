"""Run the ledger service alone: python -m services.ledger."""

from services.cli import main

raise SystemExit(main(["serve", "ledger", *__import__("sys").argv[1:]]))
