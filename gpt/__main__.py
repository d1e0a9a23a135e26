"""``python -m gpt VERB ...``: the ``gpt`` command (the verbs are in gpt/commands/__init__.py)."""

from gpt.commands import main

if __name__ == "__main__":
    main()
