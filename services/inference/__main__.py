"""Run the inference service alone: python -m services.inference."""

from services.cli import main

raise SystemExit(main(["serve", "inference", *__import__("sys").argv[1:]]))
