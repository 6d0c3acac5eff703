"""Run the cache service alone: python -m services.cache."""

from services.cli import main

raise SystemExit(main(["serve", "cache", *__import__("sys").argv[1:]]))
