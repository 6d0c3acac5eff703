"""Run the router service alone: python -m services.router."""

from services.cli import main

raise SystemExit(main(["serve", "router", *__import__("sys").argv[1:]]))
